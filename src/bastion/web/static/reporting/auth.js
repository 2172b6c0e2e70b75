// Who the user is and how requests carry it (docs/reporting.md, "Pages and the reading list"; docs/authentication.md),
// shared by the reporting pages and the admin page. With authentication on, the credential (an OIDC access token, an
// API key or a break-glass token) lives in this tab's sessionStorage and goes as "Authorization: Bearer" on every API
// request. It is had by signing in at the identity provider (the authorization code flow with PKCE, RFC 7636, against
// /api/auth/config's issuer: startLogin, then finishLogin where the issuer sends the browser back) or by pasting a
// token or API key. With authentication off, the user names themself once ("Your name", kept in localStorage) and the
// pages send that name as "user" where the API asks for one.
//
//   import { api, headers, withUser, signIn, esc } from '/reporting/static/auth.js';
//   const who = await signIn(box);   // null: not signed in (the box offers the sign-in); else {user, roles, may(role)}

const CREDENTIAL = 'bastion.credential';
const PKCE = 'bastion.pkce';
const USER = 'bastion.reporting.user';
//: Where the identity provider sends a reporting page back (register https://HOST/reporting at the issuer).
const REPORTING_REDIRECT = '/reporting';
let config = null;
let whoBox = null;

export const esc = (s) => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));

/** The request headers that carry the credential (none while authentication is off or nobody signed in). */
export function headers(extra = {}) {
  const credential = sessionStorage.getItem(CREDENTIAL);
  return credential ? {...extra, Authorization: 'Bearer ' + credential} : {...extra};
}

/** /api/auth/config, read once: {enabled, issuer, client_id, scope}. */
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

/** A JSON API request: {ok, status, data, error}; `body` is sent as JSON. A 401 while authentication is on (the
 * credential expired or was revoked meanwhile) forgets the credential and shows the sign-in again. */
export async function api(path, {method = 'GET', body} = {}) {
  const init = {method, headers: headers(body === undefined ? {} : {'Content-Type': 'application/json'})};
  if (body !== undefined) init.body = JSON.stringify(body);
  let r;
  try { r = await fetch(path, init); } catch (e) { return {ok: false, status: 0, data: null, error: e.message}; }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  const error = r.ok ? '' : (data && data.error) || text || r.statusText;
  if (r.status === 401 && config && config.enabled) signedOut(`Your sign-in is no longer accepted (${error})`);
  return {ok: r.ok, status: r.status, data, error};
}

// --- the identity provider's login: authorization code + PKCE (RFC 7636), OpenID Connect Core 1.0 3.1 ----------

const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const random = () => b64url(crypto.getRandomValues(new Uint8Array(32)));

/** The issuer's metadata (OpenID Connect Discovery 1.0). */
async function discovery(issuer) {
  const r = await fetch(issuer.replace(/\/$/, '') + '/.well-known/openid-configuration');
  if (!r.ok) throw new Error(`the identity provider answered ${r.status}`);
  return r.json();
}

/** Send the browser to the issuer's login; it comes back to `redirectUri` (registered at the issuer) with a code for
 * finishLogin, which then goes on to `returnTo`. */
export async function startLogin(cfg, redirectUri, returnTo) {
  const meta = await discovery(cfg.issuer);
  const verifier = random(), state = random();
  const challenge = b64url(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)));
  sessionStorage.setItem(PKCE, JSON.stringify({verifier, state, returnTo}));
  location.assign(meta.authorization_endpoint + '?' + new URLSearchParams({response_type: 'code',
    client_id: cfg.client_id, redirect_uri: redirectUri, scope: cfg.scope, state,
    code_challenge: challenge, code_challenge_method: 'S256'}));
}

/** Back from the issuer (`params`: the page's ?code=&state=): exchange the code for the access token and keep it as
 * the credential. Answers where to go on (startLogin's `returnTo`); throws with the reason it failed. */
export async function finishLogin(cfg, params, redirectUri) {
  const asked = JSON.parse(sessionStorage.getItem(PKCE) || '{}');
  sessionStorage.removeItem(PKCE);
  if (!asked.state || asked.state !== params.get('state')) throw new Error('the login answer does not match the request (state)');
  if (params.get('error')) throw new Error(params.get('error_description') || params.get('error'));
  const meta = await discovery(cfg.issuer);
  const r = await fetch(meta.token_endpoint, {method: 'POST', body: new URLSearchParams({
    grant_type: 'authorization_code', code: params.get('code'), redirect_uri: redirectUri,
    client_id: cfg.client_id, code_verifier: asked.verifier})});
  const body = await r.json().catch(() => ({}));
  if (!r.ok || !body.access_token) throw new Error(body.error_description || body.error || `token endpoint ${r.status}`);
  sessionStorage.setItem(CREDENTIAL, body.access_token);
  return asked.returnTo || '';
}

// --- who the user is, shown in the page's header -----------------------------------------------------------------

/** The party as the pages use it: {user, roles, via, may(role)}; `may` as the server's Principal.may (admin: all). */
function party(user, roles, via) {
  return {user, roles, via, may: (role) => roles.includes('admin') || roles.includes(role)};
}

/** Show the sign-in in the header's box (why: a refused or expired credential) and mark the page signed out
 * (body[data-signed-in="0"]), so the pages show their "Sign in" state instead of their data. */
function signedOut(why = '') {
  sessionStorage.removeItem(CREDENTIAL);
  document.body.dataset.signedIn = '0';
  if (!whoBox) return;
  const cfg = config || {};
  whoBox.innerHTML = `${why ? `<span class="bad" id="signin-why">${esc(why)}.</span> ` : ''}<b>Not signed in.</b>
    ${cfg.issuer && cfg.client_id ? '<button type="button" id="oidc-login">Sign in</button> or' : ''}
    <form id="paste-login" style="display:inline"><input name="credential" type="password" size="20" autocomplete="off"
    placeholder="token or API key" aria-label="token or API key"><button>Use it</button></form>`;
  const login = whoBox.querySelector('#oidc-login');
  if (login) {
    login.onclick = () => startLogin(cfg, location.origin + REPORTING_REDIRECT, location.pathname + location.search)
      .catch(e => signedOut(`The identity provider cannot be reached (${e.message})`));
  }
  whoBox.querySelector('#paste-login').onsubmit = (ev) => {
    ev.preventDefault();
    const v = new FormData(ev.target).get('credential').trim();
    if (v) { sessionStorage.setItem(CREDENTIAL, v); location.reload(); }
  };
  document.dispatchEvent(new CustomEvent('signed-out', {detail: why}));
}

/** Fill `box` with who the user is and answer that party, or null when nobody is signed in (authentication on): then
 * the box offers the issuer's sign-in and a field to paste a token or API key. With authentication off the box asks
 * "Your name" and `changed()` is called when it changes. A page the issuer sends back to (?code=) finishes the login
 * here and goes on to the page it started from (this promise then never settles). */
export async function signIn(box, changed = () => {}) {
  whoBox = box;
  const cfg = await authConfig();
  if (!cfg.enabled) {
    box.innerHTML = `<label>Your name <input id="user-name" size="16" placeholder="e.g. Dr Smith" value="${esc(userName())}"></label>`;
    box.querySelector('#user-name').addEventListener('change', (e) => {
      localStorage.setItem(USER, e.target.value.trim()); changed();
    });
    document.body.dataset.signedIn = '1';
    return party(userName(), ['admin'], 'anonymous');
  }
  const params = new URLSearchParams(location.search);
  if (params.has('state') && (params.has('code') || params.has('error')) && sessionStorage.getItem(PKCE)) {
    let next = location.pathname;
    try { next = await finishLogin(cfg, params, location.origin + location.pathname) || next; } catch (e) {
      history.replaceState(null, '', location.pathname);
      signedOut(`Sign-in failed: ${e.message}`);
      return null;
    }
    location.replace(next);
    return new Promise(() => {});
  }
  if (!sessionStorage.getItem(CREDENTIAL)) { signedOut(); return null; }
  const r = await api('/api/whoami');
  if (!r.ok) {
    if (r.status !== 401) signedOut(`Your credential was refused (${r.status}: ${r.error})`);
    return null;
  }
  const who = party(r.data.user, r.data.roles || [], r.data.via);
  box.innerHTML = `Signed in as <b id="signed-in-user">${esc(who.user)}</b> (${esc(who.roles.join(', ') || 'no role')}) ` +
    (r.data.emergency ? `<b class="bad">BREAK-GLASS</b> ` : '') + '<button type="button" id="sign-out">Sign out</button>';
  box.querySelector('#sign-out').onclick = () => { sessionStorage.removeItem(CREDENTIAL); location.reload(); };
  document.body.dataset.signedIn = '1';
  return who;
}

/** "Sign in" as the page's own message (not a blank page) while nobody is signed in: `what` says what it shows. */
export function signInFirst(what) {
  return `<span class="bad" id="sign-in-first">Sign in to see ${esc(what)}:</span> with the identity provider, or paste
    a token or API key (top right).`;
}

/** The page's message for a party whose roles do not allow it (`need`: e.g. "viewer or radiologist"). */
export function notForYou(who, what, need) {
  return `<span class="bad" id="not-for-you">${esc(what)} needs the ${esc(need)} role; ${esc(who.user)} holds
    ${esc(who.roles.join(', ') || 'no role')}.</span>`;
}
