// The reading list (/reporting): studies with their report state, priority and claim (GET /api/reading-list), a
// claim taken or released from the row (POST / DELETE /api/reading-list/{study}/claim), the priority set there
// (PUT .../priority), and "open" to the editor beside the viewer (/reporting/study/{uid}). With authentication on,
// nobody signed in sees "Sign in" instead of the list, a party that may read it but not claim (viewer) sees it without
// the claim buttons and priorities, and a party that may not read it (typist) is told so.
import { api, esc, notForYou, signIn, signInFirst, userName, withUser } from '/reporting/static/auth.js';

const q = (s) => document.querySelector(s);
const PAGE = 50;
const pname = (s) => { const [family, ...rest] = String(s).split('^'); const given = rest.join(' ').trim();
  return given ? `${family}, ${given}` : family; };
const date = (s) => /^\d{8}$/.test(s) ? `${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6)}` : s;
let shown = PAGE;
let loads = 0;  // the latest load() started: an older one's answer, arriving after it, is not shown
let rendered = '';  // the rows shown: a refresh that finds them unchanged leaves the page alone
let user = '';
let writer = true;  // may claim and set priorities (radiologist, or anyone while authentication is off)

function params() {
  const p = new URLSearchParams({limit: String(shown)});
  for (const [k, v] of new FormData(q('#filters'))) if (String(v).trim()) p.set(k, String(v).trim());
  return p;
}

function row(s) {
  const mine = s.claim && s.claim.user === user;
  const claim = s.claim ? `<span class="${mine ? 'ok' : ''}" title="until ${esc(new Date(s.claim.expires).toLocaleTimeString())}">${esc(s.claim.user)}</span>` : '<span class="muted">—</span>';
  const button = !writer ? '' : !s.claim ? `<button type="button" data-claim="${esc(s.study)}">claim</button>`
    : mine ? `<button type="button" data-release="${esc(s.study)}">release</button>` : '';
  const priorities = ['stat', 'urgent', 'routine'].map(p => `<option${p === s.priority ? ' selected' : ''}>${p}</option>`).join('');
  return `<tr data-study="${esc(s.study)}">
    <td><select class="priority ${esc(s.priority)}" data-priority="${esc(s.study)}" aria-label="priority"${writer ? '' : ' disabled'}>${priorities}</select></td>
    <td>${esc(pname(s.patient_name))}</td><td>${esc(s.patient_id)}</td><td>${esc(date(s.study_date))}</td>
    <td>${esc(s.accession)}</td><td>${esc(s.modalities.join(', '))}</td><td>${esc(s.description)}</td>
    <td><span class="badge ${esc(s.state)}" data-state="${esc(s.state)}">${esc(s.state)}</span></td>
    <td class="claim">${claim}</td>
    <td class="actions">${button} <a href="/reporting/study/${encodeURIComponent(s.study)}" data-open="${esc(s.study)}">open</a></td></tr>`;
}

async function load() {
  if (document.body.dataset.signedIn === '0') return;
  const mine = ++loads;
  const r = await api('/api/reading-list?' + params());
  if (mine !== loads) return;  // a later load (after a claim, say) was started: its answer is the current one
  if (document.body.dataset.signedIn === '0') return;  // refused: the sign-in is shown (auth.js)
  if (!r.ok) { q('#status').innerHTML = `<span class="bad">${r.status}: ${esc(r.error)}</span>`; return; }
  const studies = r.data.studies;
  const rows = studies.map(row).join('') || '<tr><td colspan="10" class="muted">no studies</td></tr>';
  // Replaced only when they changed: rows swapped under the pointer lose the click being made on them (a mouse
  // press on one button and its release on its replacement click neither) and close an open priority list.
  if (rows !== rendered) { q('#studies tbody').innerHTML = rows; rendered = rows; }
  q('#more').hidden = studies.length < shown;
  if (!q('#status').dataset.sticky) q('#status').textContent = `${studies.length} stud${studies.length === 1 ? 'y' : 'ies'}`;
}

function say(html, sticky = true) {
  q('#status').innerHTML = html;
  if (sticky) { q('#status').dataset.sticky = '1'; setTimeout(() => { delete q('#status').dataset.sticky; }, 8000); }
}

q('#studies').addEventListener('click', async (e) => {
  const t = e.target;
  const claim = t.getAttribute && t.getAttribute('data-claim');
  const release = t.getAttribute && t.getAttribute('data-release');
  if (!claim && !release) return;
  if (!user) { say('<span class="bad">Say who you are first (Your name, top right).</span>'); return; }
  const study = claim || release;
  const r = claim ? await api(`/api/reading-list/${encodeURIComponent(study)}/claim`, {method: 'POST', body: withUser()})
    : await api(`/api/reading-list/${encodeURIComponent(study)}/claim?` + new URLSearchParams(withUser()), {method: 'DELETE'});
  say(r.ok ? (claim ? 'claimed' : 'released') : `<span class="bad">${r.status}: ${esc(r.error)}</span>`);
  load();
});
q('#studies').addEventListener('change', async (e) => {
  const study = e.target.getAttribute && e.target.getAttribute('data-priority');
  if (!study) return;
  const r = await api(`/api/reading-list/${encodeURIComponent(study)}/priority`, {method: 'PUT', body: {priority: e.target.value}});
  if (!r.ok) say(`<span class="bad">${r.status}: ${esc(r.error)}</span>`);
  load();
});
q('#filters').addEventListener('submit', (e) => { e.preventDefault(); shown = PAGE; load(); });
q('#more').addEventListener('click', () => { shown += PAGE; load(); });

async function start() {
  const who = await signIn(q('#who'), () => { user = userName(); load(); });
  document.addEventListener('signed-out', () => say(signInFirst('the reading list')));
  if (!who) { say(signInFirst('the reading list')); document.body.dataset.ready = '1'; return; }
  if (!who.may('viewer') && !who.may('radiologist')) {
    say(notForYou(who, 'The reading list', 'viewer or radiologist') +
      (who.may('typist') ? ' Your work is in the <a href="/reporting/typing">typing queue</a>.' : ''));
    document.body.dataset.ready = '1';
    return;
  }
  user = who.user;
  writer = who.may('radiologist');
  await load();
  document.body.dataset.ready = '1';
  setInterval(load, 10000);
}
start();
