// The typing queue page (/reporting/typing; docs/reporting.md, "Typing queue"): GET /api/typing lists the rejected
// recordings, oldest first, each played from GET /api/typing/{report}/{audio}; "Done" posts the typed text to
// POST /api/typing/{report}/{audio} and the item leaves the page. Who types: auth.js (the credential, or the name);
// nobody signed in sees "Sign in", a party that may not work the queue (viewer) is told so.
import { api, esc, headers, notForYou, signIn, signInFirst, withUser } from '/reporting/static/auth.js';

const $ = (id) => document.getElementById(id);
const path = (item) => `/api/typing/${encodeURIComponent(item.report)}/${encodeURIComponent(item.audio)}`;

function status(html) { $('typing-status').innerHTML = html; }

async function recording(item, div) {
  const r = await fetch(path(item), { headers: headers() });
  if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
  const blob = await r.blob();
  div.dataset.bytes = String(blob.size);
  div.querySelector('audio').src = URL.createObjectURL(blob);
}

function card(item) {
  const div = document.createElement('div');
  div.className = 'typing-item';
  div.dataset.report = item.report;
  div.dataset.audio = item.audio;
  div.innerHTML = `
    <h2>${esc(item.patient_name || item.patient_id)} <span class="muted">${esc(item.patient_id)} ·
      ${esc(item.modality)} · ${esc(item.accession)}</span></h2>
    <p class="muted">Dictated by ${esc(item.dictated_by)}, ${esc(new Date(item.dictated_at).toLocaleString())};
      ${esc(Number(item.seconds).toFixed(1))} s; rejected by ${esc(item.rejected_by)}.</p>
    <audio controls preload="none"></audio>
    <textarea aria-label="typed text" placeholder="Type what was said"></textarea>
    <button type="button" data-done>Done</button> <span data-note></span>`;
  const note = div.querySelector('[data-note]');
  recording(item, div).catch(e => { note.innerHTML = `<span class="bad">The recording could not be read: ${esc(e.message)}</span>`; });
  div.querySelector('[data-done]').addEventListener('click', async () => {
    const text = div.querySelector('textarea').value;
    if (!text.trim()) { note.textContent = 'Type the text first.'; return; }
    const r = await api(path(item), { method: 'POST', body: withUser({ text }) });
    if (!r.ok) { note.innerHTML = `<span class="bad">${r.status}: ${esc(r.error)}</span>`; return; }
    div.remove();
    status('<span class="ok">Typed text added to the report.</span>');
    $('typing-empty').hidden = $('typing-queue').children.length > 0;
  });
  return div;
}

async function load() {
  if (document.body.dataset.signedIn === '0') return;
  const r = await api('/api/typing');
  if (document.body.dataset.signedIn === '0') return;  // refused: the sign-in is shown (auth.js)
  if (!r.ok) { status(`<span class="bad">The queue could not be read: ${r.status} ${esc(r.error)}</span>`); return; }
  $('typing-queue').replaceChildren(...r.data.queue.map(card));
  $('typing-empty').hidden = r.data.queue.length > 0;
}

async function start() {
  const who = await signIn($('who'), load);
  document.addEventListener('signed-out', () => status(signInFirst('the typing queue')));
  if (!who) status(signInFirst('the typing queue'));
  else if (!who.may('typist') && !who.may('radiologist')) status(notForYou(who, 'The typing queue', 'typist or radiologist'));
  else await load();
  document.body.dataset.ready = '1';
}
start();
