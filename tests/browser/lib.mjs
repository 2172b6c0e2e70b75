// What every headless check here shares: its arguments, Debian's Chromium with a fresh profile, a page whose failed
// requests, console errors and page errors are collected, named steps, and the one JSON line it prints.
//
//   import { parseArgs, openBrowser, watchPage, runStep, finish, fatal } from './lib.mjs';
//
// A check prints ONE JSON line on stdout (also written to OUT/result.json) and exits 0 only when it passed and no
// request failed (status >= 400 or a network error, unless the check allows it) and the page raised no error.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

/** `--name value` pairs into an object: `names` lists the accepted names (without `--`), `required` those that must
 * be given, `numbers` those read as numbers; `timeout` defaults to 30000 ms and `base` loses its trailing slashes. */
export function parseArgs(argv, { names, required = [], numbers = ['timeout'], defaults = {} }) {
  const opts = { timeout: 30000, ...defaults };
  const known = new Set([...names, 'timeout']);
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!argv[i].startsWith('--') || !known.has(key) || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}`);
    }
    opts[key] = numbers.includes(key) ? Number(argv[i + 1]) : argv[i + 1];
  }
  for (const k of required) if (opts[k] === undefined) throw new Error(`missing --${k}`);
  if (typeof opts.base === 'string') opts.base = opts.base.replace(/\/+$/, '');
  if (typeof opts.out === 'string') { opts.out = resolve(opts.out); mkdirSync(opts.out, { recursive: true }); }
  return opts;
}

/** Debian's Chromium, headless; `extraArgs` are added to the usual flags. */
export function openBrowser(extraArgs = []) {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: [...CHROMIUM_ARGS, ...extraArgs] });
}

/** Collect the page's failed requests and errors into `report.failedRequests` and `report.consoleErrors`
 * (made if missing); `allow(url, status)` may excuse an expected refusal. */
export function watchPage(page, report, { timeout = 30000, allow = () => false } = {}) {
  report.failedRequests ??= [];
  report.consoleErrors ??= [];
  page.setDefaultTimeout(timeout);
  page.on('response', r => {
    if (r.status() >= 400 && !allow(r.url(), r.status())) report.failedRequests.push({ url: r.url(), status: r.status() });
  });
  page.on('requestfailed', r => report.failedRequests.push({ url: r.url(), failure: r.failure()?.errorText }));
  page.on('console', m => { if (m.type() === 'error') report.consoleErrors.push(m.text().slice(0, 500)); });
  page.on('pageerror', e => report.consoleErrors.push(`pageerror: ${String(e).slice(0, 500)}`));
  return page;
}

/** Run `fn`; a failure is recorded in `report.errors` as "name: first line" and the check goes on. */
export async function runStep(report, name, fn) {
  report.errors ??= [];
  try {
    await fn();
    return true;
  } catch (e) {
    report.errors.push(`${name}: ${String(e.message || e).split('\n')[0]}`);
    return false;
  }
}

/** Print the report, write it to OUT/result.json, and set the exit code: 0 when `passed` and nothing failed. */
export function finish(report, passed, out) {
  const ok = passed && !(report.errors || []).length && !(report.failedRequests || []).length &&
    !(report.consoleErrors || []).length;
  if (out) writeFileSync(join(out, 'result.json'), JSON.stringify(report, null, 2));
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = ok ? 0 : 1;
}

/** For `main().catch(fatal)`: one JSON line naming what went wrong, exit 2. */
export function fatal(e) {
  process.stdout.write(JSON.stringify({ errors: [`fatal: ${e && e.message ? e.message : e}`] }) + '\n');
  process.exitCode = 2;
}
