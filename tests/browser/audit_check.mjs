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

import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--no-first-run'];
const OPTIONS = { '--base': 'base', '--out': 'out', '--user': 'user', '--timeout': 'timeout' };

function parseArgs(argv) {
  const opts = { timeout: 30000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = OPTIONS[argv[i]];
    if (!key || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    opts[key] = key === 'timeout' ? Number(argv[i + 1]) : argv[i + 1];
  }
  for (const k of ['base', 'out', 'user']) if (!opts[k]) throw new Error(`missing --${k}`);
  opts.base = opts.base.replace(/\/+$/, '');
  return opts;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const out = resolve(opts.out);
  mkdirSync(out, { recursive: true });
  const report = { verifyLine: null, rows: 0, userRow: null, filteredKinds: null, failedRequests: [],
    consoleErrors: [], errors: [] };
  const step = async (name, fn) => {
    try { await fn(); } catch (e) { report.errors.push(`${name}: ${e.message.split('\n')[0]}`); }
  };
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(opts.timeout);
    page.on('response', r => { if (r.status() >= 400) report.failedRequests.push({ url: r.url(), status: r.status() }); });
    page.on('requestfailed', r => report.failedRequests.push({ url: r.url(), failure: r.failure()?.errorText }));
    page.on('console', m => { if (m.type() === 'error') report.consoleErrors.push(m.text().slice(0, 500)); });
    page.on('pageerror', e => report.consoleErrors.push(`pageerror: ${String(e).slice(0, 500)}`));

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
      await page.locator('#audit').screenshot({ path: join(out, 'admin-audit.png') }).catch(() => {});
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
  const ok = report.verifyLine !== null && report.verifiedAgain && report.userRow !== null && report.filteredKinds !== null &&
    !report.errors.length && !report.failedRequests.length && !report.consoleErrors.length;
  writeFileSync(join(out, 'result.json'), JSON.stringify(report, null, 2));
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = ok ? 0 : 1;
}

main().catch(e => {
  process.stdout.write(JSON.stringify({ errors: [`fatal: ${e.message}`] }) + '\n');
  process.exitCode = 2;
});
