#!/usr/bin/env node
// Headless check that the viewer and the admin page log in at an OpenID Connect issuer and then work.
//
//   node auth_check.mjs --step viewer --base http://127.0.0.1:PORT --issuer http://127.0.0.1:PORT2
//        --study <UID> --patient TEXT --out DIR [--timeout MS]
//   node auth_check.mjs --step admin --base ... --issuer ... --user NAME --out DIR [--emergency-user NAME]
//        [--credential KEY]   (sign in by pasting KEY, an API key or a token, instead of at the issuer)
//
// Uses Debian's /usr/bin/chromium (CHROMIUM_PATH overrides) with a fresh profile.
// --step viewer: open BASE/ (the OHIF study list). Authentication is on, so the viewer goes to the issuer's
//   authorization endpoint, comes back to /callback with a code, exchanges it (PKCE) and shows the study list:
//   wait for the study's row (TEXT); then open /viewer?StudyInstanceUIDs=UID and wait until its metadata and at
//   least one frame were answered 200. Every /dicom-web request must carry "Authorization: Bearer" and none may
//   be answered 401 or 403.
// --step admin: open BASE/admin, click "Sign in with the identity provider", come back signed in (the page says
//   "Signed in as NAME") with its admin-only requests answered (/api/statistics 200), and, with --emergency-user, wait until the "Break-glass overrides" panel lists a row
//   for that user.
// Prints ONE JSON line on stdout (also DIR/result.json) and exits 0 only when every step passed.

import { join } from 'node:path';
import { fatal, finish, openBrowser, parseArgs, watchConsole } from './lib.mjs';

async function main() {
  const opts = parseArgs(process.argv.slice(2), {
    names: ['step', 'base', 'issuer', 'study', 'patient', 'out', 'user', 'emergency-user', 'credential'],
    required: ['step', 'base', 'out'], defaults: { timeout: 90000 },
  });
  const out = opts.out;
  const report = { step: opts.step, ok: false, errors: [], dicomweb: 0, unauthenticatedDicomweb: [], refused: [],
    visitedIssuer: false, consoleErrors: [] };
  const browser = await openBrowser([], { webgl: true });
  const deadline = Date.now() + opts.timeout;
  const left = () => Math.max(1000, deadline - Date.now());
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    watchConsole(page, report);  // informational: finish() below counts only report.errors
    page.on('request', req => {
      const url = req.url();
      if (opts.issuer && url.startsWith(opts.issuer + '/authorize')) report.visitedIssuer = true;
      if (url.includes('/dicom-web/')) {
        report.dicomweb++;
        if (!(req.headers()['authorization'] || '').startsWith('Bearer ')) report.unauthenticatedDicomweb.push(url.slice(0, 200));
      }
    });
    const answered = { metadata: 0, frames: 0, statistics: 0 };
    page.on('response', rsp => {
      const url = rsp.url();
      if (url.startsWith(opts.base) && (rsp.status() === 401 || rsp.status() === 403)) {
        report.refused.push(`${rsp.status()} ${url.slice(0, 200)}`);
      }
      if (rsp.status() === 200 && url.includes('/metadata')) answered.metadata++;
      if (rsp.status() === 200 && url.includes('/frames/')) answered.frames++;
      if (rsp.status() === 200 && url.includes('/api/statistics')) answered.statistics++;
    });
    if (opts.step === 'viewer') {
      await page.goto(opts.base + '/', { waitUntil: 'domcontentloaded', timeout: left() });
      await page.getByText(opts.patient, { exact: false }).first().waitFor({ timeout: left() });
      report.studyListOk = true;
      report.afterLoginUrl = page.url();
      await page.screenshot({ path: join(out, 'study-list.png') });
      await page.goto(`${opts.base}/viewer?StudyInstanceUIDs=${encodeURIComponent(opts.study)}`,
        { waitUntil: 'domcontentloaded', timeout: left() });
      while ((answered.metadata < 1 || answered.frames < 1) && Date.now() < deadline) await page.waitForTimeout(250);
      report.answered = answered;
      await page.screenshot({ path: join(out, 'viewer.png') });
      report.viewerOk = answered.metadata > 0 && answered.frames > 0;
      report.ok = report.studyListOk && report.viewerOk && report.visitedIssuer && report.dicomweb > 0
        && report.unauthenticatedDicomweb.length === 0 && report.refused.length === 0;
    } else {
      await page.goto(opts.base + '/admin', { waitUntil: 'domcontentloaded', timeout: left() });
      if (opts.credential) {  // the fallback: a token or API key pasted into the form
        await page.locator('#paste-login input').waitFor({ state: 'visible', timeout: left() });
        await page.fill('#paste-login input', opts.credential);
        await page.click('#paste-login button');
      } else {
        await page.locator('#oidc-login').waitFor({ state: 'visible', timeout: left() });
        await page.click('#oidc-login');
      }
      await page.locator('#who', { hasText: `Signed in as ${opts.user}` }).waitFor({ timeout: left() });
      report.who = await page.locator('#who').innerText();
      report.signedIn = true;
      while (answered.statistics < 1 && Date.now() < deadline) await page.waitForTimeout(250);
      report.adminDataLoaded = answered.statistics > 0;  // the page's own admin-only requests now succeed
      if (opts['emergency-user']) {
        const row = page.locator('#emergency-list tbody tr', { hasText: opts['emergency-user'] });
        await row.first().waitFor({ timeout: left() });
        report.emergencyRow = await row.first().innerText();
      }
      await page.screenshot({ path: join(out, 'admin.png'), fullPage: true });
      report.ok = report.signedIn && report.adminDataLoaded && (report.visitedIssuer || !!opts.credential)
        && (!opts['emergency-user'] || !!report.emergencyRow);
    }
  } catch (e) {
    report.errors.push(String(e && e.stack || e).slice(0, 1000));
  } finally {
    await browser.close();
  }
  finish(report, report.ok, out, { clean: ['errors'] });
}

main().catch(fatal);
