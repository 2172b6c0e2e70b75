#!/usr/bin/env node
// Headless check of deleting and undeleting a study from the admin page (/admin: the search results' "delete"
// button, the Deleted studies panel's "undelete"; docs/deletion.md).
//
//   node deletion_check.mjs --base http://127.0.0.1:PORT --out DIR --study UID [--timeout MS]
//
// Uses Debian's /usr/bin/chromium (CHROMIUM_PATH overrides) with a fresh profile. Steps:
//   1. open BASE/admin and wait for the search result of STUDY;
//   2. click its "delete", answer the reason prompt with "wrong patient (browser)", and wait until the study has
//      left the results and is listed in the Deleted studies panel (its cells go in the report as deletedRow);
//   3. click its "undelete", answer the prompt, and wait until it is back in the results and gone from the panel.
// Prints ONE JSON line on stdout (also written to DIR/result.json):
//   {"prompts":[str],"deletedRow":{...}|null,"restored":bool,"failedRequests":[...],"consoleErrors":[...],
//    "errors":[...]}
// and exits 0 only when every step passed, no request failed (status >= 400 or network error) and the page raised
// no error. A screenshot of the panel goes to DIR.

import { join } from 'node:path';
import { fatal, finish, openBrowser, parseArgs, runStep, watchPage } from './lib.mjs';

const REASON = 'wrong patient (browser)';

async function main() {
  const opts = parseArgs(process.argv.slice(2), { names: ['base', 'out', 'study'],
    required: ['base', 'out', 'study'] });
  const report = { prompts: [], deletedRow: null, restored: false, failedRequests: [], consoleErrors: [], errors: [] };
  const step = (name, fn) => runStep(report, name, fn);
  const browser = await openBrowser();
  try {
    const page = watchPage(await browser.newPage({ viewport: { width: 1280, height: 900 } }), report,
      { timeout: opts.timeout });
    page.on('dialog', d => { report.prompts.push(d.message()); d.accept(d.message().startsWith('Delete') ? REASON : 'restored'); });
    const result = page.locator(`#results tbody tr[data-study="${opts.study}"]`);
    const listed = page.locator(`#deleted-list tbody tr[data-study="${opts.study}"]`);

    await step('search', async () => {
      await page.goto(`${opts.base}/admin`, { waitUntil: 'domcontentloaded' });
      await result.waitFor({ state: 'visible' });
    });
    await step('delete', async () => {
      await result.locator('button[data-delete]').click();
      await result.waitFor({ state: 'detached' });
      await listed.waitFor({ state: 'visible' });
      const cells = listed.locator('td');
      const text = async i => (await cells.nth(i).innerText()).trim();
      report.deletedRow = { study: await text(0), patient: await text(1), instances: await text(2), by: await text(4),
        reason: await text(5), state: await text(6) };
      await page.locator('#deleted').screenshot({ path: join(opts.out, 'admin-deleted.png') }).catch(() => {});
    });
    await step('undelete', async () => {
      await listed.locator('button[data-undelete]').click();
      await listed.waitFor({ state: 'detached' });
      await result.waitFor({ state: 'visible' });
      report.restored = true;
    });
  } finally {
    await browser.close().catch(() => {});
  }
  finish(report, report.deletedRow !== null && report.restored, opts.out);
}

main().catch(fatal);
