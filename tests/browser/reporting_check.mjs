#!/usr/bin/env node
// Headless check of the reporting pages (docs/reporting.md, "Pages and the reading list"), authentication off:
//
//   node reporting_check.mjs --base http://127.0.0.1:PORT --study <StudyInstanceUID> --patient TEXT --out DIR
//
//   1. user A ("Dr A") opens /reporting, sees the study "unreported", claims it;
//   2. user B ("Dr B", a second browser context) sees A's claim, has no claim button, and a claim of theirs is
//      refused (409 naming A);
//   3. A opens the study: the OHIF viewer in the iframe shows it (a cornerstone viewport); A starts a ct-head draft,
//      fills Findings with a pick-list button and Impression by typing, saves (version 2) and signs;
//   4. QIDO-RS has the report's SR series in the study; the OHIF study list shows the study with modality SR;
//   5. A amends with a reason: the state is amended, the history shows the final and the amended versions, and
//      GET /api/reports/{id} lists two SR instances.
// Prints ONE JSON line (lib.mjs): {"listUnreported", "claimedByA", "bSeesClaim", "bClaimRefused", "viewerCanvas",
// "picked", "saved", "signed", "srSeries", "ohifListShowsSR", "amended", "historyStates", "srCount", "reportId", ...}.

import { fatal, finish, openBrowser, parseArgs, runStep, watchPage } from './lib.mjs';

const opts = parseArgs(process.argv.slice(2), { names: ['base', 'study', 'patient', 'out'],
  required: ['base', 'study', 'patient', 'out'], defaults: { timeout: 90000 } });
const IMPRESSION = 'No acute intracranial abnormality on this check.';
const AMENDED = 'Amended impression: small chronic lacunar infarct.';

async function nameMyself(page, name) {
  const field = page.locator('#user-name');
  await field.fill(name);
  await field.dispatchEvent('change');
}

async function main() {
  const report = { failedRequests: [], consoleErrors: [] };
  // Refusals the check provokes (B's claim), and what the bundled viewer asks for and may lack (its own files);
  // the reporting pages' and the APIs' requests must all succeed.
  const allow = (url, status) => (status === 409 && url.includes('/claim')) ||
    !/^\/(reporting|api|dicom-web)(\/|$)/.test(new URL(url).pathname);
  const browser = await openBrowser(['--use-angle=swiftshader', '--enable-unsafe-swiftshader']);
  try {
    const a = watchPage(await (await browser.newContext({ viewport: { width: 1600, height: 1000 } })).newPage(),
      report, { timeout: opts.timeout, allow });
    const b = watchPage(await (await browser.newContext()).newPage(), report, { timeout: opts.timeout, allow });
    const row = (page) => page.locator(`tr[data-study="${opts.study}"]`);

    await runStep(report, 'reading list', async () => {
      await a.goto(`${opts.base}/reporting`);
      await a.locator('body[data-ready="1"]').waitFor({ state: 'attached' });
      await nameMyself(a, 'Dr A');
      await row(a).locator('.badge', { hasText: 'unreported' }).waitFor();
      report.listUnreported = true;
    });
    await runStep(report, 'claim as A', async () => {
      const posted = a.waitForResponse(r => r.url().includes('/claim') && r.request().method() === 'POST',
        { timeout: 30000 }).then(r => r.status(), e => `no POST of the claim: ${e.message.split('\n')[0]}`);
      try {
        await row(a).locator('[data-claim]').click();
        report.claimPosted = await posted;
        await row(a).locator('td.claim', { hasText: 'Dr A' }).waitFor({ timeout: 30000 });
      } catch (e) {  // what the page and the server say, for the failure's report
        report.claimPosted ??= await posted;
        report.claimPage = { status: await a.locator('#status').innerText().catch(() => '?'),
          user: await a.evaluate(() => localStorage.getItem('bastion.reporting.user')).catch(() => '?'),
          row: (await row(a).innerText().catch(() => '?')).replace(/\s+/g, ' ') };
        report.claimServer = await (await fetch(`${opts.base}/api/reading-list?study=${opts.study}`)).json()
          .catch(() => '?');
        throw e;
      }
      report.claimedByA = true;
    });
    await runStep(report, 'B sees the claim', async () => {
      await b.goto(`${opts.base}/reporting`);
      await b.locator('body[data-ready="1"]').waitFor({ state: 'attached' });
      await nameMyself(b, 'Dr B');
      await row(b).locator('td.claim', { hasText: 'Dr A' }).waitFor();
      report.bSeesClaim = (await row(b).locator('[data-claim]').count()) === 0;
      const refused = await b.evaluate(async (study) => {
        const r = await fetch(`/api/reading-list/${encodeURIComponent(study)}/claim`, {
          method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ user: 'Dr B' }) });
        return { status: r.status, error: (await r.json()).error };
      }, opts.study);
      report.bClaimRefused = refused.status === 409 && refused.error.includes('Dr A');
      report.bClaimAnswer = refused;
    });

    const answers = [];
    a.on('dialog', (d) => d.accept(answers.shift() ?? ''));
    await runStep(report, 'open the study', async () => {
      await row(a).locator('[data-open]').click();
      await a.waitForURL(`**/reporting/study/${opts.study}`);
      await a.locator('body[data-ready="1"]').waitFor({ state: 'attached' });
      await a.locator('#claim', { hasText: 'Claimed by you' }).waitFor();
      const viewer = a.frameLocator('#viewer');
      await viewer.locator('canvas.cornerstone-canvas').first().waitFor({ state: 'attached', timeout: 90000 });
      report.viewerCanvas = true;
    });
    await runStep(report, 'draft from ct-head', async () => {
      await a.locator('#template').selectOption('ct-head');
      await a.locator('#create').click();
      await a.locator('textarea[data-section="findings"]').waitFor();
      const pick = a.locator('button[data-pick="findings"]').first();
      const text = await pick.getAttribute('data-text');
      await pick.click();
      report.picked = (await a.locator('textarea[data-section="findings"]').inputValue()).includes(text);
      const impression = a.locator('textarea[data-section="impression"]');
      await impression.fill('');
      await impression.pressSequentially(IMPRESSION);
      await a.locator('#save').click();
      await a.locator('#version', { hasText: 'version 2' }).waitFor();
      report.saved = (await impression.inputValue()) === IMPRESSION;
    });
    await runStep(report, 'sign', async () => {
      answers.push('Dr A');
      await a.locator('#sign').click();
      await a.locator('#state', { hasText: 'final' }).waitFor();
      report.signed = true;
      report.reportId = await a.evaluate(() => window.bastionReport.id);
    });
    await runStep(report, 'SR over QIDO-RS', async () => {
      const r = await fetch(`${opts.base}/dicom-web/studies/${opts.study}/series?Modality=SR`,
        { headers: { Accept: 'application/dicom+json' } });
      report.srSeries = r.status === 200 ? (await r.json()).length : 0;
    });
    await runStep(report, 'OHIF study list', async () => {
      const list = watchPage(await a.context().newPage(), report, { timeout: opts.timeout, allow });
      await list.goto(`${opts.base}/`);
      const entry = list.locator('[data-cy="study-list-results"] tr, [role="row"], tr').filter({ hasText: opts.patient })
        .first();
      await entry.waitFor({ state: 'visible', timeout: 60000 });
      report.ohifListRow = (await entry.innerText()).replace(/\s+/g, ' ').slice(0, 300);
      report.ohifListShowsSR = /\bSR\b/.test(report.ohifListRow);
      report.viewerLinksReadingList = await list.locator('a#bastion-reporting-link').getAttribute('href');
      await list.close();
    });
    await runStep(report, 'amend', async () => {
      await a.locator('textarea[data-section="impression"]').fill(AMENDED);
      answers.push('Corrected the impression', 'Dr A');
      await a.locator('#amend').click();
      await a.locator('#state', { hasText: 'amended' }).waitFor();
      report.amended = true;
      report.historyStates = await a.locator('#history tbody tr td:nth-child(2)').allInnerTexts();
      const r = await fetch(`${opts.base}/api/reports/${report.reportId}`);
      report.srCount = (await r.json()).sr.length;
    });
  } finally {
    await browser.close();
  }
  // Chromium logs the 409 the check provokes as a console error; any other refusal is in failedRequests.
  report.consoleErrors = report.consoleErrors.filter(m => !/status of 409 \(Conflict\)/.test(m));
  const passed = report.listUnreported && report.claimedByA && report.bSeesClaim && report.bClaimRefused &&
    report.viewerCanvas && report.picked && report.saved && report.signed && report.srSeries === 1 &&
    report.ohifListShowsSR && report.amended && report.srCount === 2;
  finish(report, passed, opts.out);
}

main().catch(fatal);
