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

import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--no-first-run'];
const OPTIONS = { '--base': 'base', '--out': 'out', '--study': 'study', '--timeout': 'timeout' };
const REASON = 'wrong patient (browser)';

function parseArgs(argv) {
  const opts = { timeout: 30000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = OPTIONS[argv[i]];
    if (!key || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    opts[key] = key === 'timeout' ? Number(argv[i + 1]) : argv[i + 1];
  }
  for (const k of ['base', 'out', 'study']) if (!opts[k]) throw new Error(`missing --${k}`);
  opts.base = opts.base.replace(/\/+$/, '');
  return opts;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const out = resolve(opts.out);
  mkdirSync(out, { recursive: true });
  const report = { prompts: [], deletedRow: null, restored: false, failedRequests: [], consoleErrors: [], errors: [] };
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
      await page.locator('#deleted').screenshot({ path: join(out, 'admin-deleted.png') }).catch(() => {});
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
  const ok = report.deletedRow !== null && report.restored && !report.errors.length && !report.failedRequests.length &&
    !report.consoleErrors.length;
  writeFileSync(join(out, 'result.json'), JSON.stringify(report, null, 2));
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = ok ? 0 : 1;
}

main().catch(e => {
  process.stdout.write(JSON.stringify({ errors: [`fatal: ${e.message}`] }) + '\n');
  process.exitCode = 2;
});
