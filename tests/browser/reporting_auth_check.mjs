#!/usr/bin/env node
// Headless check of the reporting pages with authentication on (docs/reporting.md, "Pages and the reading list"):
//
//   node reporting_auth_check.mjs --base http://127.0.0.1:PORT --issuer http://127.0.0.1:PORT2 --reader NAME
//        --study UID --second TOKEN --second-user NAME --viewer-key KEY --viewer-user NAME --typist TOKEN
//        --typist-user NAME --typing-report ID --typed TEXT --expired TOKEN --out DIR [--timeout MS]
//
// One Chromium, a context per party (each its own sessionStorage):
//   A. the radiologist READER opens /reporting: the page says "Sign in" (no credential yet); signs in at the issuer
//      (authorization code + PKCE, back to /reporting), claims the study, opens it beside the viewer (a cornerstone
//      viewport in the iframe), drafts from ct-head, saves, signs (no name asked for) and amends (the reason asked);
//   B. a second radiologist pastes a token: sees READER's claim, has no claim button, and a claim of theirs is
//      refused (409 naming READER);
//   C. a viewer pastes an API key: the list shows the study amended, with no claim buttons and priorities fixed; the
//      editor shows the report read-only: no Start, Save, Preliminary, Sign, Amend, Claim or dictation;
//   D. a typist pastes a token: /reporting/typing lists the rejected recording of TYPING-REPORT, plays it, types
//      TEXT, Done; /reporting and the editor say the role does not allow them (and ask nothing of the API);
//   E. a page opened with no credential shows "Sign in" with the issuer's button and the paste field, not a blank
//      page; an expired token pasted is refused with the reason, "Sign in" again; and a credential that expires
//      while the reading list is open brings the "Sign in" back at the next request.
// In A-D every request to /api (but the public /api/auth/config), /dicom-web and /wado carries the credential
// ("unauthenticated" lists those that did not) and none is refused (401/403: failedRequests).
// Prints ONE JSON line (lib.mjs); exit 0 only when every step passed.

import { fatal, finish, openBrowser, parseArgs, runStep, watchPage } from './lib.mjs';

const opts = parseArgs(process.argv.slice(2), {
  names: ['base', 'issuer', 'reader', 'study', 'second', 'second-user', 'viewer-key', 'viewer-user', 'typist',
    'typist-user', 'typing-report', 'typed', 'expired', 'out'],
  required: ['base', 'issuer', 'reader', 'study', 'second', 'second-user', 'viewer-key', 'viewer-user', 'typist',
    'typist-user', 'typing-report', 'typed', 'expired', 'out'],
  defaults: { timeout: 90000 },
});
const IMPRESSION = 'No acute intracranial abnormality, signed with authentication on.';
const AMENDED = 'Amended impression: small chronic lacunar infarct.';
const PUBLIC_API = new Set(['/api/auth/config', '/api/openapi.json']);

async function main() {
  const report = { failedRequests: [], consoleErrors: [], unauthenticated: [], dialogs: [], visitedIssuer: false };
  const browser = await openBrowser(['--use-angle=swiftshader', '--enable-unsafe-swiftshader',
    '--autoplay-policy=no-user-gesture-required']);
  // A party's page: requests to the API carry the credential; only the viewer's own missing files (404) and the
  // refusals a step provokes (`allow`) may fail.
  const open = async (label, allow = () => false) => {
    const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
    const page = watchPage(await context.newPage(), report, { timeout: opts.timeout, allow: (url, status) =>
      allow(url, status) || (status === 404 && !/^\/(reporting|api|dicom-web|wado)(\/|$)/.test(new URL(url).pathname)) });
    page.on('request', (req) => {
      const url = new URL(req.url());
      if (url.href.startsWith(opts.issuer + '/authorize')) report.visitedIssuer = true;
      if (url.origin !== new URL(opts.base).origin || PUBLIC_API.has(url.pathname)) return;
      if (!/^\/(api|dicom-web|wado)(\/|$)/.test(url.pathname)) return;
      const h = req.headers();
      if (!(h.authorization || '').startsWith('Bearer ') && !h['x-api-key']) {
        report.unauthenticated.push(`${label} ${req.method()} ${url.pathname}`);
      }
    });
    return page;
  };
  const ready = (page) => page.locator('body[data-ready="1"]').waitFor({ state: 'attached' });
  const row = (page) => page.locator(`tr[data-study="${opts.study}"]`);
  const paste = async (page, credential) => {
    await page.locator('#paste-login input').fill(credential);
    await Promise.all([page.waitForEvent('load'), page.locator('#paste-login button').click()]);
  };
  const signedInAs = (page, user) => page.locator('#signed-in-user', { hasText: user }).waitFor();
  const inPage = (page, path, init) => page.evaluate(async ([p, i]) => {
    const { api } = await import('/reporting/static/auth.js');
    const r = await api(p, i);
    return { status: r.status, error: r.error, data: r.data };
  }, [path, init]);

  try {
    const a = await open('A');
    const answers = [];
    a.on('dialog', (d) => { report.dialogs.push(d.message()); d.accept(answers.shift() ?? ''); });

    await runStep(report, 'A: no credential, "Sign in"', async () => {
      await a.goto(`${opts.base}/reporting`);
      await ready(a);
      await a.locator('#sign-in-first').waitFor();
      report.aSignInShown = await a.locator('#oidc-login').isVisible();
    });
    await runStep(report, 'A: sign in at the issuer', async () => {
      await a.locator('#oidc-login').click();
      await signedInAs(a, opts.reader);
      await ready(a);
      report.aUrlAfterLogin = a.url();
      report.aSignedIn = !new URL(a.url()).searchParams.has('code');
    });
    await runStep(report, 'A: claim', async () => {
      await row(a).locator('.badge', { hasText: 'unreported' }).waitFor();
      await row(a).locator('[data-claim]').click();
      await row(a).locator('td.claim', { hasText: opts.reader }).waitFor();
      report.claimedByReader = true;
    });

    const b = await open('B', (url, status) => status === 409 && url.includes('/claim'));
    await runStep(report, 'B: sees the claim, cannot take it', async () => {
      await b.goto(`${opts.base}/reporting`);
      await ready(b);
      await paste(b, opts.second);
      await signedInAs(b, opts['second-user']);
      await row(b).locator('td.claim', { hasText: opts.reader }).waitFor();
      report.bNoClaimButton = (await row(b).locator('[data-claim], [data-release]').count()) === 0;
      report.bClaimAnswer = await inPage(b, `/api/reading-list/${encodeURIComponent(opts.study)}/claim`,
        { method: 'POST', body: {} });
      report.bClaimRefused = report.bClaimAnswer.status === 409 && report.bClaimAnswer.error.includes(opts.reader);
    });

    await runStep(report, 'A: open the study beside the viewer', async () => {
      await row(a).locator('[data-open]').click();
      await a.waitForURL(`**/reporting/study/${opts.study}`);
      await ready(a);
      await a.locator('#claim', { hasText: 'Claimed by you' }).waitFor();
      await a.frameLocator('#viewer').locator('canvas.cornerstone-canvas').first()
        .waitFor({ state: 'attached', timeout: Math.max(opts.timeout, 90000) });
      report.viewerCanvas = true;
    });
    await runStep(report, 'A: draft', async () => {
      await a.locator('#template').selectOption('ct-head');
      await a.locator('#create').click();
      const impression = a.locator('textarea[data-section="impression"]');
      await impression.fill('');
      await impression.pressSequentially(IMPRESSION);
      await a.locator('#save').click();
      await a.locator('#version', { hasText: 'version 2' }).waitFor();
      report.saved = true;
    });
    await runStep(report, 'A: sign', async () => {
      await a.locator('#sign').click();
      await a.locator('#state', { hasText: 'final' }).waitFor();
      report.signMessage = await a.locator('#message').innerText();
      report.reportId = await a.evaluate(() => window.bastionReport.id);
      report.signDialogs = report.dialogs.length;  // none: the signer is the token's user
    });
    await runStep(report, 'A: amend', async () => {
      await a.locator('textarea[data-section="impression"]').fill(AMENDED);
      answers.push('Corrected the impression');
      await a.locator('#amend').click();
      await a.locator('#state', { hasText: 'amended' }).waitFor();
      report.historyUsers = await a.locator('#history tbody tr td:nth-child(4)').allInnerTexts();
      report.amended = true;
    });

    const c = await open('C');
    await runStep(report, 'C: the viewer reads the list', async () => {
      await c.goto(`${opts.base}/reporting`);
      await ready(c);
      await paste(c, opts['viewer-key']);
      await signedInAs(c, opts['viewer-user']);
      await row(c).locator('.badge', { hasText: 'amended' }).waitFor();
      report.viewerNoClaim = (await row(c).locator('[data-claim], [data-release]').count()) === 0;
      report.viewerPriorityFixed = await row(c).locator('select[data-priority]').isDisabled();
    });
    await runStep(report, 'C: the viewer reads the report', async () => {
      await c.goto(`${opts.base}/reporting/study/${encodeURIComponent(opts.study)}`);
      await ready(c);
      await c.locator('#read-only').waitFor();
      report.viewerSees = await c.locator('textarea[data-section="impression"]').inputValue();
      const shown = {};
      for (const id of ['save', 'preliminary', 'sign', 'amend', 'start', 'take', 'dictation-panel']) {
        shown[id] = await c.locator(`#${id}`).isVisible();
      }
      report.viewerShown = shown;
      report.viewerReadOnly = Object.values(shown).every(v => !v) &&
        await c.locator('textarea[data-section="impression"]').getAttribute('readonly') !== null;
    });

    const d = await open('D');
    await runStep(report, 'D: the typist types', async () => {
      await d.goto(`${opts.base}/reporting/typing`);
      await ready(d);
      await paste(d, opts.typist);
      await signedInAs(d, opts['typist-user']);
      const item = d.locator(`.typing-item[data-report="${opts['typing-report']}"]`);
      await d.locator(`.typing-item[data-report="${opts['typing-report']}"][data-bytes]`).waitFor();
      report.typingBytes = Number(await item.getAttribute('data-bytes'));
      await item.locator('textarea').fill(opts.typed);
      await item.locator('[data-done]').click();
      await item.waitFor({ state: 'detached' });
      report.typed = true;
    });
    await runStep(report, 'D: nothing else for the typist', async () => {
      await d.goto(`${opts.base}/reporting`);
      await ready(d);
      await d.locator('#not-for-you').waitFor();
      report.typistListMessage = await d.locator('#status').innerText();
      report.typistListEmpty = (await d.locator('tr[data-study]').count()) === 0;
      await d.goto(`${opts.base}/reporting/study/${encodeURIComponent(opts.study)}`);
      await ready(d);
      await d.locator('#not-for-you').waitFor();
      report.typistEditorMessage = await d.locator('#message').innerText();
      report.typistEditorEmpty = !(await d.locator('#viewer').getAttribute('src')) &&
        !(await d.locator('#editor').isVisible()) && !(await d.locator('#start').isVisible());
    });

    // E provokes refusals: the expired credential's 401s.
    const e = await open('E', (url, status) => status === 401);
    await runStep(report, 'E: no credential', async () => {
      await e.goto(`${opts.base}/reporting/study/${encodeURIComponent(opts.study)}`);
      await ready(e);
      await e.locator('#sign-in-first').waitFor();
      report.missingShown = await e.locator('#oidc-login').isVisible() && await e.locator('#paste-login').isVisible()
        && !(await e.locator('#viewer').getAttribute('src'));
      report.missingMessage = await e.locator('#message').innerText();
    });
    await runStep(report, 'E: an expired token', async () => {
      await paste(e, opts.expired);
      await ready(e);
      await e.locator('#signin-why').waitFor();
      report.expiredMessage = await e.locator('#who').innerText();
      report.expiredShown = await e.locator('#sign-in-first').isVisible() && await e.locator('#oidc-login').isVisible();
    });
    await runStep(report, 'E: expires while open', async () => {
      await e.goto(`${opts.base}/reporting`);
      await ready(e);
      await paste(e, opts.second);
      await signedInAs(e, opts['second-user']);
      await row(e).waitFor();
      await e.evaluate((t) => sessionStorage.setItem('bastion.credential', t), opts.expired);
      await e.locator('#filters button[type="submit"]').click();
      await e.locator('#signin-why').waitFor();
      await e.locator('#status #sign-in-first').waitFor();
      report.expiredWhileOpen = await e.locator('#oidc-login').isVisible();
    });
  } finally {
    await browser.close();
  }
  // Chromium logs the refusals a step provokes (B's 409, E's 401s) as console errors; other refusals are in
  // failedRequests. The viewer's own script chunks are aborted when it leaves for the issuer's login in the iframe.
  report.failedRequests = report.failedRequests.filter(f => !(f.failure === 'net::ERR_ABORTED' &&
    !/^\/(reporting|api|dicom-web|wado)(\/|$)/.test(new URL(f.url).pathname)));
  report.consoleErrors = report.consoleErrors.filter(m => !/status of (409 \(Conflict\)|401 \(Unauthorized\))/.test(m));
  const passed = report.aSignInShown && report.aSignedIn && report.visitedIssuer && report.claimedByReader &&
    report.bNoClaimButton && report.bClaimRefused && report.viewerCanvas && report.saved && report.signDialogs === 0 &&
    report.amended && report.historyUsers.every(u => u === opts.reader) && report.viewerNoClaim &&
    report.viewerPriorityFixed && report.viewerSees === AMENDED && report.viewerReadOnly && report.typed &&
    report.typingBytes > 1000 && report.typistListEmpty && report.typistEditorEmpty && report.missingShown &&
    report.expiredShown && report.expiredWhileOpen && report.unauthenticated.length === 0;
  finish(report, passed, opts.out);
}

main().catch(fatal);
