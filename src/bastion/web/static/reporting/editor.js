// The report editor (/reporting/study/{uid}): the study in the bundled OHIF viewer (an iframe) beside the report pane.
// The pane starts a draft from a template (GET /api/templates, POST /api/reports), edits its sections (a textarea
// each, its pick-list as buttons that insert the option), saves (PUT with the version edited: a 409 says the report
// changed meanwhile and reloads it), marks it preliminary, signs (POST .../sign; the signer's name is asked for while
// authentication is off) and amends a signed report (POST .../amend with a reason); the version history below.
// The claim on the study is shown, taken or renewed (POST /api/reading-list/{study}/claim) while it is one's own.
//
// For the dictation panel (dictation.js), the page sets
//   window.bastionReport = { id, get: () => report JSON, reload: async () => {...}, headers: () => ({...}) }
// and dispatches the document event "report-loaded" each time it loads or reloads the report.
//
// With authentication on: nobody signed in sees "Sign in" (and no viewer); a party that may read reports but not
// write them (viewer) sees the report read-only, without Start, Save, Preliminary, Sign, Amend, claim or dictation;
// a party that may not read them (typist) is told so. The viewer beside the report needs the viewer role.
import { api, authConfig, esc, headers, notForYou, signIn, signInFirst, userName, withUser } from '/reporting/static/auth.js';

const q = (s) => document.querySelector(s);
const study = decodeURIComponent(location.pathname.replace(/^\/reporting\/study\//, ''));
const OPEN = ['draft', 'preliminary'];
let report = null;
let templates = [];
let user = '';
let writer = true;  // may write, sign and claim (radiologist, or anyone while authentication is off)
let dirty = false;
let renewing = null;

window.bastionReport = {
  get id() { return report ? report.id : null; },
  get: () => report,
  reload: async () => { await loadReport(); },
  headers: () => headers(),
};

const pname = (s) => { const [family, ...rest] = String(s).split('^'); const given = rest.join(' ').trim();
  return given ? `${family}, ${given}` : family; };
const date = (s) => /^\d{8}$/.test(s) ? `${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6)}` : s;
const say = (html) => { q('#message').innerHTML = html; };
// A 401 shows the sign-in instead (auth.js, the 'signed-out' event).
const failed = (r) => { if (document.body.dataset.signedIn !== '0') say(`<span class="bad">${r.status}: ${esc(r.error)}</span>`); };

async function loadStudy() {
  const r = await api('/api/reading-list?' + new URLSearchParams({study, limit: '1'}));
  if (!r.ok) { failed(r); return null; }
  const s = r.data.studies[0];
  if (!s) { q('#study-facts').innerHTML = `<span class="bad">no study ${esc(study)} in the archive</span>`; return null; }
  q('#study-title').textContent = `${pname(s.patient_name)} · ${s.patient_id}`;
  q('#study-facts').innerHTML = `<b>${esc(pname(s.patient_name))}</b> · ${esc(s.patient_id)} · ${esc(date(s.study_date))}
    · ${esc(s.accession)} · ${esc(s.modalities.join(', '))} · ${esc(s.description)}`;
  showClaim(s.claim, r.data.claim_minutes);
  return s;
}

function showClaim(claim, minutes) {
  const mine = claim && claim.user === user;
  q('#claim').innerHTML = !claim ? `Not claimed${writer ? ' <button type="button" id="take">Claim</button>' : ''}`
    : mine ? `<span class="ok">Claimed by you</span> until ${esc(new Date(claim.expires).toLocaleTimeString())}`
      : `<span class="bad">Claimed by ${esc(claim.user)}</span> until ${esc(new Date(claim.expires).toLocaleTimeString())}`;
  const take = q('#take');
  if (take) take.onclick = () => claimStudy();
  clearInterval(renewing);
  if (mine && minutes) renewing = setInterval(claimStudy, Math.max(15, Math.min(minutes * 30, 300)) * 1000);
}

async function claimStudy() {
  if (!user) { say('<span class="bad">Say who you are first (Your name, top right).</span>'); return; }
  const r = await api(`/api/reading-list/${encodeURIComponent(study)}/claim`, {method: 'POST', body: withUser()});
  if (!r.ok) failed(r);
  await loadStudy();
}

async function loadReport() {
  let doc = null;
  if (report) {
    const r = await api(`/api/reports/${encodeURIComponent(report.id)}`);
    if (!r.ok) { failed(r); return; }
    doc = r.data;
  } else {
    const r = await api('/api/reports?' + new URLSearchParams({study, limit: '1'}));
    if (!r.ok) { failed(r); return; }
    doc = r.data.reports[0] || null;
  }
  report = doc;
  dirty = false;
  render();
  document.dispatchEvent(new CustomEvent('report-loaded'));
}

function render() {
  q('#start').hidden = !!report || !writer;
  q('#editor').hidden = !report;
  if (!report) {
    if (!writer) say('<span class="muted" id="read-only">No report yet.</span>');
    return;
  }
  const open = OPEN.includes(report.state);
  q('#template-title').textContent = report.template_title || report.template;
  q('#state').textContent = report.state;
  q('#state').className = `badge ${report.state}`;
  q('#version').textContent = `version ${report.version}`;
  const template = templates.find(t => t.name === report.template);
  const picks = Object.fromEntries((template ? template.sections : []).map(s => [s.name, s.picklist]));
  q('#sections').innerHTML = Object.entries(report.sections).map(([name, text]) => `<div class="field" data-field="${esc(name)}">
    <label for="section-${esc(name)}">${esc((report.section_titles || {})[name] || name)}</label>
    <textarea id="section-${esc(name)}" data-section="${esc(name)}" rows="3"${writer ? '' : ' readonly'}>${esc(text)}</textarea>
    <div class="picks">${(writer ? picks[name] || [] : []).map(o => `<button type="button" data-pick="${esc(name)}" data-text="${esc(o)}">${esc(o)}</button>`).join('')}</div>
    </div>`).join('');
  q('#save').hidden = q('#preliminary').hidden = q('#sign').hidden = !open || !writer;
  q('#amend').hidden = open || !writer;
  q('#history tbody').innerHTML = report.history.slice().reverse().map(h => `<tr data-version="${h.version}">
    <td>${h.version}</td><td><span class="badge ${esc(h.state)}">${esc(h.state)}</span></td>
    <td>${esc(new Date(h.at).toLocaleString())}</td><td>${esc(h.user)}</td></tr>`).join('');
  q('#sr').innerHTML = report.sr.length ? `Stored as SR: ${report.sr.map(esc).join(', ')}` +
    (report.reason ? `<br>Last amendment: ${esc(report.reason)}` : '') : '';
  if (!writer) say(`<span class="muted" id="read-only">Read only: reports are written and signed by radiologists (${esc(report.state)}).</span>`);
  else if (!open) say(q('#message').textContent ? q('#message').innerHTML : 'Signed: changes made here become an amendment.');
}

function sections() {
  return Object.fromEntries([...document.querySelectorAll('textarea[data-section]')].map(t => [t.dataset.section, t.value]));
}

async function save(state) {
  const body = withUser({sections: sections(), version: report.version, ...(state ? {state} : {})});
  const r = await api(`/api/reports/${encodeURIComponent(report.id)}`, {method: 'PUT', body});
  if (r.status === 409) {
    say(`<span class="bad">Not saved: ${esc(r.error)}. The report was reloaded; make your change again.</span>`);
    await loadReport();
    return false;
  }
  if (!r.ok) { failed(r); return false; }
  report = r.data;
  dirty = false;
  render();
  say(`<span class="ok">Saved (version ${report.version}).</span>`);
  document.dispatchEvent(new CustomEvent('report-loaded'));
  return true;
}

async function signer() {
  if ((await authConfig()).enabled) return {};
  const name = prompt('Sign as (your name):', userName());
  return name && name.trim() ? {user: name.trim()} : null;
}

q('#create').onclick = async () => {
  const r = await api('/api/reports', {method: 'POST', body: withUser({study, template: q('#template').value})});
  if (!r.ok) { failed(r); return; }
  report = r.data;
  say('<span class="ok">Draft started.</span>');
  await loadReport();
};
q('#save').onclick = () => save();
q('#preliminary').onclick = () => save('preliminary');
q('#sign').onclick = async () => {
  if (dirty && !(await save())) return;
  const who = await signer();
  if (!who) { say('<span class="bad">Not signed: a signer\'s name is needed.</span>'); return; }
  const r = await api(`/api/reports/${encodeURIComponent(report.id)}/sign`, {method: 'POST', body: who});
  if (!r.ok) { failed(r); return; }
  say(`<span class="ok">Signed by ${esc(r.data.signed_by)}; stored in the study.</span>`);
  await loadReport();
  q('#viewer').src = q('#viewer').src;  // the viewer shows the report's SR series
};
q('#amend').onclick = async () => {
  const reason = prompt('Why is the signed report amended?');
  if (reason === null) return;
  if (!reason.trim()) { say('<span class="bad">Not amended: a reason is needed.</span>'); return; }
  const who = await signer();
  if (!who) { say('<span class="bad">Not amended: a name is needed.</span>'); return; }
  const r = await api(`/api/reports/${encodeURIComponent(report.id)}/amend`, {method: 'POST',
    body: {...who, sections: sections(), reason: reason.trim()}});
  if (!r.ok) { failed(r); return; }
  say(`<span class="ok">Amended (version ${r.data.version}); the new SR replaces the previous one.</span>`);
  await loadReport();
};
q('#sections').addEventListener('input', () => { dirty = true; });
q('#sections').addEventListener('click', (e) => {
  const name = e.target.getAttribute && e.target.getAttribute('data-pick');
  if (!name) return;
  const area = q(`textarea[data-section="${CSS.escape(name)}"]`);
  const before = area.value.slice(0, area.selectionStart);
  const gap = before && !/\s$/.test(before) ? (area.value.includes('\n') ? '\n' : ' ') : '';
  area.setRangeText(gap + e.target.dataset.text, area.selectionStart, area.selectionEnd, 'end');
  area.focus();
  dirty = true;
});
window.addEventListener('beforeunload', (e) => { if (dirty) e.preventDefault(); });

async function start() {
  const who = await signIn(q('#who'), () => { user = userName(); loadStudy(); });
  document.addEventListener('signed-out', () => say(signInFirst('this study and its report')));
  const stop = (html) => { say(html); q('#study-facts').textContent = ''; document.body.dataset.ready = '1'; };
  if (!who) { stop(signInFirst('this study and its report')); return; }
  if (!who.may('viewer') && !who.may('radiologist')) { stop(notForYou(who, 'A report', 'viewer or radiologist')); return; }
  user = who.user;
  writer = who.may('radiologist');
  q('#dictation-panel').hidden = !writer;
  if (who.may('viewer')) q('#viewer').src = `/viewer?StudyInstanceUIDs=${encodeURIComponent(study)}`;
  else q('#viewer').srcdoc = '<p style="color:#ccc;font:14px system-ui;padding:1em">The images need the viewer role.</p>';
  const t = await api('/api/templates');
  templates = t.ok ? t.data.templates : [];
  const s = await loadStudy();
  const modality = s ? s.modalities.find(m => m !== 'SR') || '' : '';
  const ordered = [...templates.filter(x => x.modality === modality), ...templates.filter(x => x.modality !== modality)];
  q('#template').innerHTML = ordered.map(x => `<option value="${esc(x.name)}">${esc(x.title)}</option>`).join('');
  await loadReport();
  document.body.dataset.ready = '1';
}
start();
