// The dictation panel of the report editor (docs/dictation.md, "In the editor"): Record / Stop with the browser's
// MediaRecorder (audio/webm), the recording posted to POST /api/reports/{id}/audio while "Transcribing…" shows, the
// transcript with Accept (it is in the draft already) and Reject (POST .../audio/{audio}/reject: the recording goes
// to the typing queue), and the report's recordings, each with a play control.
//
// The editor page provides <section id="dictation-panel"> and
//   window.bastionReport = { id, get: () => report JSON, reload: async () => {...}, headers: () => ({...}) }
// and dispatches the document event "report-loaded" on each (re)load of the report; auth.js names the user.

import { esc, withUser } from '/reporting/static/auth.js';

const panel = document.getElementById('dictation-panel');
const OPEN = ['draft', 'preliminary'];

panel.innerHTML = `
  <h3>Dictation</h3>
  <div class="dictation-controls">
    <button type="button" id="dictation-record">● Record</button>
    <button type="button" id="dictation-stop" disabled>■ Stop</button>
    <span id="dictation-status" role="status" aria-live="polite"></span>
  </div>
  <div id="dictation-result" hidden>
    <p>Heard: <q id="dictation-transcript"></q></p>
    <button type="button" id="dictation-accept">Accept</button>
    <button type="button" id="dictation-reject">Reject (send to typing)</button>
  </div>
  <ul id="dictation-recordings"></ul>
  <style>
    #dictation-panel .spinner { display: inline-block; width: .9em; height: .9em; border: 2px solid #999;
      border-top-color: transparent; border-radius: 50%; animation: dictation-spin .8s linear infinite;
      vertical-align: middle; }
    @keyframes dictation-spin { to { transform: rotate(360deg); } }
    #dictation-recordings li { margin: .3em 0; }
    #dictation-panel .error { color: #b00; }
  </style>`;

const $ = (id) => document.getElementById(id);
const ui = { record: $('dictation-record'), stop: $('dictation-stop'), status: $('dictation-status'),
  result: $('dictation-result'), transcript: $('dictation-transcript'), accept: $('dictation-accept'),
  reject: $('dictation-reject'), list: $('dictation-recordings') };
let recorder = null;
let last = null; // the audio id of the transcript shown

const report = () => window.bastionReport;
const base = () => `/api/reports/${encodeURIComponent(report().id)}/audio`;

function status(html, error = false) {
  ui.status.innerHTML = html;
  ui.status.className = error ? 'error' : '';
}

async function call(url, init = {}) {
  const r = await fetch(url, { ...init, headers: { ...report().headers(), ...(init.headers || {}) } });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error || `${r.status} ${r.statusText}`);
  }
  return r;
}

function describe(a, open) {
  const state = a.status === 'rejected' ? 'rejected: waiting for typing'
    : a.status === 'typed' ? `typed by ${esc(a.typed_by)}` : '';
  return `${esc(new Date(a.at).toLocaleString())}, ${esc(Number(a.seconds).toFixed(1))} s, ${esc(a.user)}:
    <q>${esc(a.transcript)}</q> <em>${state}</em>
    ${open && !a.status ? '<button type="button" data-reject>Reject</button>' : ''}`;
}

// Each recording's item is made once and then only its description changes, so a player keeps what it plays.
function render() {
  const doc = report()?.get();
  if (!doc) return;
  const open = OPEN.includes(doc.state);
  ui.record.disabled = !open || recorder !== null;
  const items = (doc.audio || []).map(a => {
    let li = ui.list.querySelector(`li[data-audio="${CSS.escape(a.id)}"]`);
    if (!li) {
      li = document.createElement('li');
      li.dataset.audio = a.id;
      li.innerHTML = '<button type="button" data-play>▶ Play</button> <audio data-player hidden controls></audio> <span data-about></span>';
    }
    li.dataset.status = a.status || 'transcribed';
    li.querySelector('[data-about]').innerHTML = describe(a, open);
    return li;
  });
  ui.list.replaceChildren(...items);
}

async function play(li) {
  const player = li.querySelector('audio[data-player]');
  if (!player.src) {
    const r = await call(`${base()}/${encodeURIComponent(li.dataset.audio)}`);
    const blob = await r.blob();
    li.dataset.bytes = String(blob.size);
    player.src = URL.createObjectURL(blob);
  }
  player.hidden = false;
  await player.play().catch(() => {}); // a headless or muted page may refuse to play: the control stays
}

async function reject(audioId) {
  status('<span class="spinner"></span> Rejecting…');
  await call(`${base()}/${encodeURIComponent(audioId)}/reject`, { method: 'POST', body: JSON.stringify(withUser()),
    headers: { 'Content-Type': 'application/json' } });
  if (last === audioId) ui.result.hidden = true;
  status('Rejected: the recording is in the typing queue.');
  await report().reload();
}

async function upload(blob) {
  ui.record.disabled = true;
  status('<span class="spinner"></span> Transcribing…');
  panel.dataset.state = 'transcribing';
  try {
    const r = await call(base(), { method: 'POST', body: blob,
      headers: { 'Content-Type': blob.type || 'audio/webm' } });
    const answer = await r.json();
    last = answer.audio;
    ui.transcript.textContent = answer.transcript || '(nothing recognised)';
    ui.result.hidden = false;
    status(`Transcribed ${Number(answer.seconds).toFixed(1)} s.`);
    panel.dataset.state = 'transcribed';
    await report().reload();
  } catch (e) {
    status(`Dictation failed: ${esc(e.message)}`, true);
    panel.dataset.state = 'failed';
  } finally {
    render();
  }
}

async function start() {
  let stream;
  try {
    // The server's recogniser wants the voice as the microphone heard it: no call-style processing.
    stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false, noiseSuppression: false,
      autoGainControl: false } });
  } catch (e) {
    status(`No microphone: ${esc(e.message)}`, true);
    return;
  }
  const type = MediaRecorder.isTypeSupported('audio/webm;codecs=opus') ? 'audio/webm;codecs=opus' : 'audio/webm';
  const chunks = [];
  recorder = new MediaRecorder(stream, { mimeType: type });
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach(t => t.stop());
    recorder = null;
    ui.stop.disabled = true;
    upload(new Blob(chunks, { type: 'audio/webm' }));
  };
  recorder.start(250);
  ui.record.disabled = true;
  ui.stop.disabled = false;
  ui.result.hidden = true;
  status('Recording…');
  panel.dataset.state = 'recording';
}

const guarded = (fn) => (...args) => fn(...args).catch(e => status(esc(e.message), true));
ui.record.addEventListener('click', guarded(start));
ui.stop.addEventListener('click', () => recorder?.stop());
ui.accept.addEventListener('click', guarded(async () => {
  ui.result.hidden = true;
  status('Accepted.');
  await report().reload();
}));
ui.reject.addEventListener('click', guarded(() => reject(last)));
ui.list.addEventListener('click', guarded(async (e) => {
  const li = e.target.closest('li[data-audio]');
  if (!li) return;
  if (e.target.matches('[data-play]')) await play(li);
  else if (e.target.matches('[data-reject]')) await reject(li.dataset.audio);
}));
document.addEventListener('report-loaded', render);
render();
