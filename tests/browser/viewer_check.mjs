#!/usr/bin/env node
// Headless check that the bundled OHIF viewer works against a DICOMweb server.
//
//   node viewer_check.mjs --base http://127.0.0.1:PORT --study <StudyInstanceUID> --out DIR
//        [--patient TEXT] [--timeout MS] [--scrolls N]
//
// Uses Debian's /usr/bin/chromium (never downloads a browser) with a fresh profile. Steps:
//   1. open BASE/ (study list) and wait until the study's row is visible (matched by the patient
//      name that the QIDO answer gives for the study, or --patient TEXT);
//   2. open BASE/viewer?StudyInstanceUIDs=<uid>, wait for a cornerstone viewport canvas that shows
//      non-blank pixels (read in the page, falling back to a PNG screenshot of the element);
//   3. scroll the series with the mouse wheel and check the image changes, or at least stays non-blank.
// Every request whose URL contains /dicom-web is recorded; failed = requestfailed or status >= 400.
// Screenshots go to DIR. Prints ONE JSON line on stdout:
//   {"studyListOk":bool,"viewportNonBlank":bool,"failedDicomweb":[...],"dicomwebRequests":N,"errors":[...], ...}
// and exits 0 only when the list showed the study, the viewport rendered, no DICOMweb request failed and
// no step errored. Extra keys (scrollChanged, sliceLabelBefore/After, consoleErrors, failedOther = non-DICOMweb
// requests answered >= 400, screenshots, timingsMs, ...) are informational. The report is also written
// to DIR/result.json. Options: --patient TEXT (text of the study's row; default: the family name from
// the QIDO answer), --timeout MS (whole run, default 120000), --scrolls N (wheel steps, default 5).
// CHROMIUM_PATH overrides /usr/bin/chromium.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inflateSync } from 'node:zlib';
import { chromium } from 'playwright-core';
import { fatal, finish, launchOptions, parseArgs, runStep, watchConsole } from './lib.mjs';

const sleep = ms => new Promise(r => setTimeout(r, ms));

// ---- pixel statistics ---------------------------------------------------------------------------
// rgba: RGBA pixels of a width x height image. "Non-blank" = at least 1% of the pixels differ from the
// dominant (background) colour and there are more than a couple of distinct grey levels. `grid` is a
// GRID x GRID mean-grey thumbnail used to tell whether two images differ. Self-contained: it is also
// run inside the page (serialised with toString()).
function pixelStats(rgba, width, height) {
  const GRID = 32;
  const n = width * height;
  if (!n) return { pixels: 0, nonBackground: 0, fraction: 0, levels: 0, grid: [] };
  const counts = new Map();
  const step = Math.max(1, Math.floor(n / 20000));
  for (let i = 0; i < n; i += step) {
    const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  let bg = 0;
  let bgCount = -1;
  for (const [k, c] of counts) if (c > bgCount) (bg = k), (bgCount = c);
  const br = (bg >> 16) & 255, bgG = (bg >> 8) & 255, bb = bg & 255;
  let differing = 0;
  const levels = new Set();
  const sums = new Float64Array(GRID * GRID);
  const cnts = new Uint32Array(GRID * GRID);
  for (let y = 0; y < height; y++) {
    const gy = Math.min(GRID - 1, Math.floor((y * GRID) / height));
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
      if (Math.abs(r - br) + Math.abs(g - bgG) + Math.abs(b - bb) > 24) differing++;
      const grey = (r + g + b) / 3;
      if (i % step === 0) levels.add(grey >> 2);
      const cell = gy * GRID + Math.min(GRID - 1, Math.floor((x * GRID) / width));
      sums[cell] += grey;
      cnts[cell]++;
    }
  }
  return {
    pixels: n,
    nonBackground: differing,
    fraction: Math.round((differing / n) * 10000) / 10000,
    levels: levels.size,
    grid: Array.from(sums, (v, k) => (cnts[k] ? Math.round(v / cnts[k]) : 0)),
  };
}
const isNonBlank = s => !!s && s.fraction >= 0.01 && s.levels >= 3;
// Share of thumbnail cells whose mean grey moved by more than 6 levels.
function gridChange(a, b) {
  if (!a?.grid?.length || a.grid.length !== b?.grid?.length) return 0;
  let moved = 0;
  for (let k = 0; k < a.grid.length; k++) if (Math.abs(a.grid[k] - b.grid[k]) > 6) moved++;
  return moved / a.grid.length;
}
const brief = s => s && { fraction: s.fraction, levels: s.levels, pixels: s.pixels };

// Minimal PNG decoder for Playwright screenshots (8-bit RGB/RGBA, non-interlaced).
function decodePng(buf) {
  if (buf.readUInt32BE(0) !== 0x89504e47) throw new Error('not a PNG');
  let off = 8;
  let width = 0, height = 0, bitDepth = 0, colorType = 0, interlace = 0;
  const idat = [];
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString('ascii', off + 4, off + 8);
    const data = buf.subarray(off + 8, off + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      bitDepth = data[8];
      colorType = data[9];
      interlace = data[12];
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    off += 12 + len;
  }
  const channels = { 2: 3, 6: 4, 0: 1, 4: 2 }[colorType];
  if (bitDepth !== 8 || interlace !== 0 || !channels) {
    throw new Error(`unsupported PNG (depth ${bitDepth}, colour type ${colorType}, interlace ${interlace})`);
  }
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const out = new Uint8Array(width * height * 4);
  let prev = new Uint8Array(stride);
  let p = 0;
  for (let y = 0; y < height; y++) {
    const filter = raw[p++];
    const line = new Uint8Array(raw.subarray(p, p + stride));
    p += stride;
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? line[x - channels] : 0;
      const b = prev[x];
      const c = x >= channels ? prev[x - channels] : 0;
      let v = line[x];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      line[x] = v & 255;
    }
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 4;
      const s = x * channels;
      if (channels >= 3) {
        out[o] = line[s];
        out[o + 1] = line[s + 1];
        out[o + 2] = line[s + 2];
        out[o + 3] = channels === 4 ? line[s + 3] : 255;
      } else {
        out[o] = out[o + 1] = out[o + 2] = line[s];
        out[o + 3] = channels === 2 ? line[s + 1] : 255;
      }
    }
    prev = line;
  }
  return { width, height, rgba: out };
}

// ---- viewport probing ---------------------------------------------------------------------------
const CANVAS_SELECTOR = 'canvas.cornerstone-canvas';

// Reads the largest visible cornerstone canvas in the page and returns its pixel statistics
// (computed in the page, so no pixel array crosses the wire). Copying it into a 2D canvas works for
// 2D canvases; a WebGL canvas whose drawing buffer was already presented reads back blank (seen with
// OHIF 3.13 here, depending on timing), which the screenshot fallback covers.
async function readCanvasInPage(page) {
  return page.evaluate(
    ([sel, statsSrc]) => {
      const canvases = [...document.querySelectorAll(sel)].filter(c => {
        const r = c.getBoundingClientRect();
        return r.width > 16 && r.height > 16 && c.width > 0 && c.height > 0;
      });
      if (!canvases.length) return null;
      canvases.sort((a, b) => b.width * b.height - a.width * a.height);
      const c = canvases[0];
      try {
        const copy = document.createElement('canvas');
        copy.width = c.width;
        copy.height = c.height;
        const ctx = copy.getContext('2d', { willReadFrequently: true });
        ctx.drawImage(c, 0, 0);
        const data = ctx.getImageData(0, 0, c.width, c.height).data;
        // eslint-disable-next-line no-new-func
        return { stats: new Function(`return (${statsSrc})`)()(data, c.width, c.height) };
      } catch (e) {
        return { error: String(e) };
      }
    },
    [CANVAS_SELECTOR, pixelStats.toString()],
  );
}

async function probeViewport(page, { screenshotFallback = true } = {}) {
  const result = { found: false, inPage: null, screenshot: null };
  const inPage = await readCanvasInPage(page).catch(e => ({ error: String(e) }));
  if (!inPage) return result;
  result.found = true;
  if (inPage.stats) result.inPage = inPage.stats;
  else result.inPageError = inPage.error;
  if (!isNonBlank(result.inPage) && screenshotFallback) {
    const handle = await largestCanvas(page);
    if (handle) {
      const png = await handle.screenshot({ timeout: 10000, animations: 'disabled', caret: 'hide' }).catch(() => null);
      if (png) {
        const img = decodePng(png);
        result.screenshot = pixelStats(img.rgba, img.width, img.height);
      }
    }
  }
  result.stats = isNonBlank(result.inPage) ? result.inPage : result.screenshot || result.inPage;
  result.nonBlank = isNonBlank(result.stats);
  return result;
}

async function largestCanvas(page) {
  const handles = await page.$$(CANVAS_SELECTOR);
  let best = null;
  let bestArea = 0;
  for (const h of handles) {
    const box = await h.boundingBox();
    if (box && box.width * box.height > bestArea) (best = h), (bestArea = box.width * box.height);
  }
  return best;
}

// OHIF's onboarding tour (Shepherd) puts a modal overlay over the viewport that swallows the mouse
// wheel. Bastion's app-config turns it off; should one show anyway, note it and dismiss it.
async function dismissTour(page, report) {
  const tour = page.locator('.shepherd-element');
  if (!(await tour.isVisible().catch(() => false))) return;
  report.tourShown = true;
  await page.keyboard.press('Escape').catch(() => {});
  await sleep(300);
  if (await tour.isVisible().catch(() => false)) {
    await page.locator('.shepherd-element button', { hasText: /skip/i }).first().click({ timeout: 3000 }).catch(() => {});
  }
}

// OHIF's overlay text "I:<instance> (<n>/<count>)" in the viewport, when present (informational).
async function sliceLabel(page) {
  return page
    .evaluate(() => document.body.innerText.match(/I:\s*\d+\s*\(\d+\/\d+\)/)?.[0] ?? null)
    .catch(() => null);
}

// ---- main ---------------------------------------------------------------------------------------
async function main() {
  const opts = parseArgs(process.argv.slice(2), { names: ['base', 'study', 'out', 'patient', 'scrolls'],
    required: ['base', 'study', 'out'], numbers: ['timeout', 'scrolls'], defaults: { timeout: 120000, scrolls: 5 } });
  const out = opts.out;
  const deadline = Date.now() + opts.timeout;
  const left = () => Math.max(1000, deadline - Date.now());

  const report = {
    studyListOk: false,
    viewportNonBlank: false,
    failedDicomweb: [],
    dicomwebRequests: 0,
    errors: [],
    scrollChanged: false,
    scrollNonBlank: false,
    consoleErrors: [],
    failedOther: [],
    screenshots: [],
    timingsMs: {},
  };
  const inflight = new Set();
  let lastDicomwebActivity = Date.now();
  let studyListQido = null;

  const userDataDir = mkdtempSync(join(tmpdir(), 'bastion-viewer-check-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      ...launchOptions([], { webgl: true }),
      viewport: { width: 1280, height: 800 },
      serviceWorkers: 'block',
      timeout: 60000,
    });
    const isDicomweb = url => url.includes('/dicom-web');
    context.on('request', req => {
      if (!isDicomweb(req.url())) return;
      report.dicomwebRequests++;
      inflight.add(req);
      lastDicomwebActivity = Date.now();
    });
    context.on('response', async resp => {
      const req = resp.request();
      if (!isDicomweb(req.url())) {
        if (resp.status() >= 400 && report.failedOther.length < 50) {
          report.failedOther.push({ method: req.method(), url: req.url(), status: resp.status() });
        }
        return;
      }
      if (resp.status() >= 400) {
        report.failedDicomweb.push({ method: req.method(), url: req.url(), status: resp.status() });
      }
      const path = new URL(req.url()).pathname;
      if (resp.status() < 400 && /\/studies\/?$/.test(path)) {
        try {
          studyListQido = await resp.json();
        } catch {
          /* not JSON */
        }
      }
    });
    context.on('requestfinished', req => {
      inflight.delete(req);
      lastDicomwebActivity = Date.now();
    });
    context.on('requestfailed', req => {
      inflight.delete(req);
      if (!isDicomweb(req.url())) return;
      lastDicomwebActivity = Date.now();
      report.failedDicomweb.push({
        method: req.method(),
        url: req.url(),
        failure: req.failure()?.errorText || 'failed',
      });
    });

    const page = watchConsole(context.pages()[0] || (await context.newPage()), report);  // informational

    const started = Date.now();
    const shot = async (name, target = page) => {
      const file = join(out, name);
      try {
        await target.screenshot({ path: file, timeout: 15000 });
        report.screenshots.push(file);
      } catch (e) {
        report.errors.push(`screenshot ${name}: ${e.message.split('\n')[0]}`);
      }
    };

    // 1. Study list -------------------------------------------------------------------------------
    await runStep(report, 'study list', async () => {
      await page.goto(`${opts.base}/`, { waitUntil: 'domcontentloaded', timeout: left() });
      let needle = opts.patient;
      if (!needle) {
        const t0 = Date.now();
        while (!studyListQido && Date.now() - t0 < Math.min(left(), 60000)) await sleep(200);
        if (!studyListQido) throw new Error('no QIDO /studies answer seen on the study list');
        const entry = studyListQido.find(s => s?.['0020000D']?.Value?.[0] === opts.study);
        if (!entry) throw new Error(`study ${opts.study} is not in the study list's QIDO answer`);
        const pn = entry['00100010']?.Value?.[0];
        const alpha = typeof pn === 'string' ? pn : pn?.Alphabetic || '';
        needle = alpha.split('^')[0].trim() || entry['00100020']?.Value?.[0] || entry['00080050']?.Value?.[0];
        if (!needle) throw new Error('study has no patient name, patient ID or accession number to look for');
      }
      report.studyListNeedle = needle;
      const row = page
        .locator('[data-cy="study-list-results"] tr, [role="row"], tr')
        .filter({ hasText: needle })
        .first();
      await row.waitFor({ state: 'visible', timeout: Math.min(left(), 60000) });
      report.studyListOk = true;
      report.timingsMs.studyList = Date.now() - started;
    });
    await shot('study-list.png');

    // 2. Viewer -----------------------------------------------------------------------------------
    let vp = null;
    await runStep(report, 'viewer', async () => {
      await page.goto(`${opts.base}/viewer?StudyInstanceUIDs=${encodeURIComponent(opts.study)}`, {
        waitUntil: 'domcontentloaded',
        timeout: left(),
      });
      await page.waitForSelector(CANVAS_SELECTOR, { state: 'attached', timeout: Math.min(left(), 90000) });
      report.timingsMs.viewerCanvas = Date.now() - started;
      let probe = null;
      while (Date.now() < deadline) {
        probe = await probeViewport(page);
        if (probe.nonBlank) break;
        await sleep(500);
      }
      if (probe?.nonBlank) {
        report.viewportNonBlank = true;
        report.timingsMs.viewerFirstPixels = Date.now() - started;
      } else {
        report.errors.push('viewer: the viewport canvas stayed blank');
      }
      report.viewport = probe && { inPage: brief(probe.inPage), screenshot: brief(probe.screenshot) };
      await dismissTour(page, report);
    });
    // Wait until the image stops changing (progressive loads, VOI, overlays) before the pictures.
    let before = null;
    if (report.viewportNonBlank) {
      const settleBy = Math.min(deadline, Date.now() + 10000);
      before = (await probeViewport(page)).stats;
      while (Date.now() < settleBy) {
        await sleep(700);
        const now = (await probeViewport(page)).stats;
        const moved = gridChange(before, now);
        before = now;
        if (moved === 0) break;
      }
    }
    await shot('viewer.png');
    vp = await largestCanvas(page).catch(() => null);
    if (vp) await shot('viewport.png', vp);

    // 3. Scroll the series ------------------------------------------------------------------------
    if (report.viewportNonBlank && vp && before) {
      await runStep(report, 'scroll', async () => {
        const box = await vp.boundingBox();
        const cx = box.x + box.width / 2;
        const cy = box.y + box.height / 2;
        const onTop = await page.evaluate(
          ([x, y, sel]) => {
            const e = document.elementFromPoint(x, y);
            return e && (e.matches(sel) || !!e.closest('.viewport-element')) ? null : `${e?.tagName}.${e?.getAttribute('class') || ''}`;
          },
          [cx, cy, CANVAS_SELECTOR],
        );
        if (onTop) report.errors.push(`scroll: the viewport is covered by ${onTop}`);
        report.sliceLabelBefore = await sliceLabel(page);
        await page.mouse.move(cx, cy);
        let allNonBlank = true;
        let maxChange = 0;
        for (let i = 0; i < opts.scrolls; i++) {
          await page.mouse.wheel(0, 120);
          await sleep(600);
          const p = await probeViewport(page);
          if (!p.nonBlank) allNonBlank = false;
          maxChange = Math.max(maxChange, gridChange(before, p.stats));
        }
        report.sliceLabelAfter = await sliceLabel(page);
        report.scrollNonBlank = allNonBlank;
        report.scrollChange = Math.round(maxChange * 1000) / 1000;
        report.scrollChanged = maxChange >= 0.01;
        if (!allNonBlank) report.errors.push('scroll: the viewport went blank while scrolling');
      });
      await shot('viewer-after-scroll.png');
      report.timingsMs.scrolled = Date.now() - started;
    }

    // Let the remaining DICOMweb requests (prefetch) finish so their failures are counted.
    const settleUntil = Math.min(deadline, Date.now() + 20000);
    while (Date.now() < settleUntil && (inflight.size > 0 || Date.now() - lastDicomwebActivity < 1500)) {
      await sleep(250);
    }
  } catch (e) {
    report.errors.push(`browser: ${e.message.split('\n')[0]}`);
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  }

  // Console errors and failedOther are informational; every DICOMweb request must have succeeded.
  finish(report, report.studyListOk && report.viewportNonBlank, out, { clean: ['errors', 'failedDicomweb'] });
}

main().catch(e => fatal(e, { studyListOk: false, viewportNonBlank: false, failedDicomweb: [], dicomwebRequests: 0 }));
