// What every headless check here shares: its arguments, Debian's Chromium with a fresh profile, a page whose failed
// requests, console errors and page errors are collected, named steps, and the one JSON line it prints.
//
//   import { parseArgs, openBrowser, watchPage, runStep, finish, fatal } from './lib.mjs';
//
// A check prints ONE JSON line on stdout (also written to OUT/result.json) and exits 0 only when it passed and no
// request failed (status >= 400 or a network error, unless the check allows it) and the page raised no error.
// A check whose console errors or requests are only informational (the OHIF viewer's) names the lists that count in
// finish(); one that needs the OHIF viewport's WebGL opens the browser with { webgl: true }.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];
/** The flags for a page that draws with WebGL (the OHIF viewport): SwiftShader in place of --disable-gpu, no QUIC. */
export const WEBGL_ARGS = ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'];

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

/** The launch options of Debian's Chromium, headless: the usual flags (WEBGL_ARGS with `webgl`) and `extraArgs`;
 * also for `chromium.launchPersistentContext`. */
export function launchOptions(extraArgs = [], { webgl = false } = {}) {
  return { executablePath: CHROMIUM, headless: true, args: [...(webgl ? WEBGL_ARGS : CHROMIUM_ARGS), ...extraArgs] };
}

/** Debian's Chromium, headless, as `launchOptions` says. */
export function openBrowser(extraArgs = [], options = {}) {
  return chromium.launch(launchOptions(extraArgs, options));
}

/** Collect the page's failed requests and errors into `report.failedRequests` and `report.consoleErrors`
 * (made if missing); `allow(url, status)` may excuse an expected refusal, and Chromium's console line for it. */
export function watchPage(page, report, { timeout = 30000, allow = () => false } = {}) {
  report.failedRequests ??= [];
  page.setDefaultTimeout(timeout);
  page.on('response', r => {
    if (r.status() >= 400 && !allow(r.url(), r.status())) report.failedRequests.push({ url: r.url(), status: r.status() });
  });
  page.on('requestfailed', r => report.failedRequests.push({ url: r.url(), failure: r.failure()?.errorText }));
  return watchConsole(page, report, { allow });
}

/** Collect the page's console errors and page errors into `report.consoleErrors` (made if missing; the first 50),
 * but not Chromium's "Failed to load resource" line for a response that `allow(url, status)` excuses. */
export function watchConsole(page, report, { allow = () => false } = {}) {
  report.consoleErrors ??= [];
  const add = text => { if (report.consoleErrors.length < 50) report.consoleErrors.push(text); };
  page.on('console', m => {
    if (m.type() !== 'error') return;
    const refused = /^Failed to load resource: the server responded with a status of (\d+)/.exec(m.text());
    if (refused && m.location().url && allow(m.location().url, Number(refused[1]))) return;
    add(m.text().slice(0, 500));
  });
  page.on('pageerror', e => add(`pageerror: ${String(e).slice(0, 500)}`));
  return page;
}

/** Run `fn` as the step `name`; a failure is recorded in `report.errors` as "name: first line". Once a step has
 * failed the later ones are skipped (listed in `report.skipped`): they build on it, the verdict is already "failed",
 * and waiting out each one's timeout would only hide the first failure behind the caller's deadline. Each step's
 * outcome and time go to stderr as it ends, so a check that is killed still says where it stood. */
export async function runStep(report, name, fn) {
  report.errors ??= [];
  running = { report, name, started: Date.now() };
  if (report.errors.length) {
    (report.skipped ??= []).push(name);
    process.stderr.write(`step ${name}: skipped after an earlier failure\n`);
    return false;
  }
  const started = Date.now();
  try {
    await fn();
    process.stderr.write(`step ${name}: ok in ${Date.now() - started} ms\n`);
    return true;
  } catch (e) {
    report.errors.push(`${name}: ${String(e.message || e).split('\n')[0]}`);
    process.stderr.write(`step ${name}: FAILED in ${Date.now() - started} ms: ${report.errors.at(-1)}\n`);
    return false;
  }
}

// The step under way, for the SIGTERM handler below.
let running = null;

// A caller that gives up (tests/conftest.py's browser_check_result at its time-out) sends SIGTERM: print what the
// check has so far, naming the step it was in, so the failure says where it stood rather than nothing.
process.once('SIGTERM', () => {
  const report = running ? running.report : {};
  (report.errors ??= []).push(running
    ? `terminated during step ${running.name}, ${Math.round((Date.now() - running.started) / 1000)} s into it`
    : 'terminated before the first step');
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exit(3);
});

/** Print the report, write it to OUT/result.json, and set the exit code: 0 when `passed` and every list of the
 * report that `clean` names is empty (missing counts as empty). */
export function finish(report, passed, out, { clean = ['errors', 'failedRequests', 'consoleErrors'] } = {}) {
  const ok = passed && clean.every(key => !(report[key] || []).length);
  if (out) writeFileSync(join(out, 'result.json'), JSON.stringify(report, null, 2));
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = ok ? 0 : 1;
}

/** For `main().catch(fatal)`: one JSON line naming what went wrong (after `fields`, the keys its reader expects),
 * exit 2. */
export function fatal(e, fields = {}) {
  process.stdout.write(JSON.stringify({ ...fields, errors: [`fatal: ${e && e.message ? e.message : e}`] }) + '\n');
  process.exitCode = 2;
}
