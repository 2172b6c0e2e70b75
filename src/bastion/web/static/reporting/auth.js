// What the reporting pages share (docs/reporting.md, "Pages and the reading list"): who the user is and how requests
// carry it, as the admin page does. With authentication on, the credential (an OIDC access token, an API key or a
// break-glass token: the admin page's sign-in, or pasted here) lives in this tab's sessionStorage under the admin
// page's key and goes as "Authorization: Bearer" on every API request. With it off, the user names themself once
// ("Your name", kept in localStorage) and the pages send that name as "user" where the API asks for one.
//
//   import { api, headers, withUser, signIn, esc } from '/reporting/static/auth.js';

const CREDENTIAL = 'bastion.credential';
const USER = 'bastion.reporting.user';
let config = null;

export const esc = (s) => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));

/** The request headers that carry the credential (none while authentication is off or nobody signed in). */
export function headers(extra = {}) {
  const credential = sessionStorage.getItem(CREDENTIAL);
  return credential ? {...extra, Authorization: 'Bearer ' + credential} : {...extra};
}

/** /api/auth/config, read once: {enabled, issuer, client_id, ...}. */
export async function authConfig() {
  if (!config) config = await fetch('/api/auth/config').then(r => r.json()).catch(() => ({enabled: false}));
  return config;
}

/** The name the user gave (authentication off), else ''. */
export const userName = () => localStorage.getItem(USER) || '';

/** `body` with the user's name as `user` while authentication is off (the server takes the principal's otherwise). */
export function withUser(body = {}) {
  return config && config.enabled ? body : {...body, user: userName()};
}

/** A JSON API request: {ok, status, data, error}; `body` is sent as JSON. */
export async function api(path, {method = 'GET', body} = {}) {
  const init = {method, headers: headers(body === undefined ? {} : {'Content-Type': 'application/json'})};
  if (body !== undefined) init.body = JSON.stringify(body);
  let r;
  try { r = await fetch(path, init); } catch (e) { return {ok: false, status: 0, data: null, error: e.message}; }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  return {ok: r.ok, status: r.status, data, error: r.ok ? '' : (data && data.error) || text || r.statusText};
}

/** Fill `box` with who the user is: "Your name" (authentication off), or the signed-in party and a sign-in form
 * (on). Calls `changed()` when the user changes. */
export async function signIn(box, changed = () => {}) {
  const cfg = await authConfig();
  if (!cfg.enabled) {
    box.innerHTML = `<label>Your name <input id="user-name" size="16" placeholder="e.g. Dr Smith" value="${esc(userName())}"></label>`;
    box.querySelector('#user-name').addEventListener('change', (e) => {
      localStorage.setItem(USER, e.target.value.trim()); changed();
    });
    return;
  }
  const r = sessionStorage.getItem(CREDENTIAL) ? await api('/api/whoami') : null;
  if (r && r.ok) {
    box.innerHTML = `Signed in as <b>${esc(r.data.user)}</b> (${esc((r.data.roles || []).join(', ') || 'no role')}) ` +
      '<button type="button" id="sign-out">Sign out</button>';
    box.querySelector('#sign-out').onclick = () => { sessionStorage.removeItem(CREDENTIAL); location.reload(); };
    return;
  }
  if (r) sessionStorage.removeItem(CREDENTIAL);
  box.innerHTML = `${r ? '<span class="bad">that credential was refused</span> ' : ''}<a href="/admin">Sign in</a> or
    <form id="paste-login" style="display:inline"><input name="credential" type="password" size="20" autocomplete="off"
    placeholder="token or API key" aria-label="token or API key"><button>Use it</button></form>`;
  box.querySelector('#paste-login').onsubmit = (ev) => {
    ev.preventDefault();
    const v = new FormData(ev.target).get('credential').trim();
    if (v) { sessionStorage.setItem(CREDENTIAL, v); location.reload(); }
  };
}

/** The current user's name as claims show it: the principal's (on) or the given name (off). */
export async function me() {
  const cfg = await authConfig();
  if (!cfg.enabled) return userName();
  const r = await api('/api/whoami');
  return r.ok ? r.data.user : '';
}
