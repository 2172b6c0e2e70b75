#!/usr/bin/env node
// Headless check of the admin page's Audit panel (/admin, #audit).
//
//   node audit_check.mjs --base http://127.0.0.1:PORT --out DIR --user NAME [--timeout MS]
//
// Uses Debian's /usr/bin/chromium (CHROMIUM_PATH overrides) with a fresh profile. Steps:
//   1. open BASE/admin and wait until the panel's verify line says "OK:" (the chain checked by /api/audit/verify);
//   2. wait for a row of the entries table naming NAME (its cells go in the report as userRow);
//   3. choose "retrieve" in the kind filter and wait until every row is a retrieve (their kinds go in the report);
//   4. click "verify the chain" and wait for the verify line to say "OK:" again.
// Prints ONE JSON line on stdout (also written to DIR/result.json):
//   {"verifyLine":str|null,"rows":int,"userRow":{...}|null,"filteredKinds":[...]|null,"failedRequests":[...],
//    "consoleErrors":[...],"errors":[...]}
// and exits 0 only when every step passed, no request failed (status >= 400 or network error) and the page raised
// no error. A screenshot of the panel goes to DIR.

import { join } from 'node:path';
import { fatal, finish, openBrowser, parseArgs, runStep, watchPage } from './lib.mjs';

async function main() {
  const opts = parseArgs(process.argv.slice(2), { names: ['base', 'out', 'user'], required: ['base', 'out', 'user'] });
  const report = { verifyLine: null, rows: 0, userRow: null, filteredKinds: null, failedRequests: [],
    consoleErrors: [], errors: [] };
  const step = (name, fn) => runStep(report, name, fn);
  const browser = await openBrowser();
  try {
    const page = watchPage(await browser.newPage({ viewport: { width: 1280, height: 900 } }), report,
      { timeout: opts.timeout });

    await step('verify', async () => {
      await page.goto(`${opts.base}/admin`, { waitUntil: 'domcontentloaded' });
      await page.locator('#audit-verify .ok', { hasText: /^OK: / }).waitFor({ state: 'visible' });
      report.verifyLine = (await page.locator('#audit-verify').innerText()).trim();
    });
    await step('entries', async () => {
      const row = page.locator('#audit-list tbody tr', { hasText: opts.user }).first();
      await row.waitFor({ state: 'visible' });
      const cells = row.locator('td');
      const text = async i => (await cells.nth(i).innerText()).trim();
      report.userRow = { kind: await text(1), outcome: await text(2), who: await text(3), from: await text(4),
        studies: await text(5), instances: await text(6) };
      report.rows = await page.locator('#audit-list tbody tr[data-seq]').count();
      await page.locator('#audit').screenshot({ path: join(opts.out, 'admin-audit.png') }).catch(() => {});
    });
    await step('filter', async () => {
      await page.selectOption('#audit-filter select', 'retrieve');
      await page.waitForFunction(() => {
        const rows = [...document.querySelectorAll('#audit-list tbody tr[data-seq]')];
        return rows.length > 0 && rows.every(r => r.cells[1].textContent.trim().startsWith('retrieve'));
      });
      report.filteredKinds = await page.$$eval('#audit-list tbody tr[data-seq]',
        rows => rows.map(r => r.cells[1].textContent.trim()));
    });
    await step('verify again', async () => {
      await page.click('#audit-verify-now');
      await page.locator('#audit-verify .ok', { hasText: /^OK: / }).waitFor({ state: 'visible' });
      report.verifiedAgain = true;
    });
  } finally {
    await browser.close().catch(() => {});
  }
  finish(report, report.verifyLine !== null && report.verifiedAgain && report.userRow !== null &&
    report.filteredKinds !== null, opts.out);
}

main().catch(fatal);
