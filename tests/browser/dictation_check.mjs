#!/usr/bin/env node
// Headless check of dictation in the report editor and of the typing queue (docs/dictation.md, docs/reporting.md).
//
//   node dictation_check.mjs --base http://127.0.0.1:PORT --out DIR --study UID --report ID --wav FILE
//        --record-ms MS --typed TEXT [--timeout MS]
//
// Chromium records FILE as its microphone (--use-file-for-fake-audio-capture, played once). Steps:
//   1. open the editor BASE/reporting/study/STUDY and wait for the dictation panel's Record button;
//   2. Record, wait MS, Stop; the panel shows "Transcribing…" (seen by a MutationObserver) and then the transcript;
//      the draft's dictation section is read back over the API (dictation);
//   3. Play the recording: its bytes are fetched (audioBytes);
//   4. Reject the transcript: the recording is listed as rejected (rejected) and the section read again
//      (dictationAfterReject);
//   5. open BASE/reporting/typing: the report's item is there with its audio (typingBytes); type TEXT, Done: it
//      leaves the page; the section (dictationAfterTyping) and GET /api/typing (queueAfter) are read.
// Prints ONE JSON line (also DIR/result.json); exit 0 only when every step passed and nothing failed in the page.

import { join, resolve } from 'node:path';
import { parseArgs, openBrowser, watchPage, runStep, finish, fatal } from './lib.mjs';

async function main() {
  const opts = parseArgs(process.argv.slice(2), {
    names: ['base', 'out', 'study', 'report', 'wav', 'record-ms', 'typed'],
    required: ['base', 'out', 'study', 'report', 'wav', 'record-ms', 'typed'], numbers: ['timeout', 'record-ms'],
  });
  const report = { sawTranscribing: false, transcript: null, dictation: null, audioBytes: 0, rejected: false,
    dictationAfterReject: null, typingListed: false, typingBytes: 0, typedGone: false, dictationAfterTyping: null,
    queueAfter: null };
  const browser = await openBrowser(['--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
    `--use-file-for-fake-audio-capture=${resolve(opts.wav)}%noloop`, '--autoplay-policy=no-user-gesture-required']);
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await context.grantPermissions(['microphone'], { origin: opts.base });
    const page = watchPage(await context.newPage(), report, { timeout: opts.timeout });
    const dictation = async () => page.evaluate(async (id) =>
      (await (await fetch(`/api/reports/${id}`, { headers: window.bastionReport?.headers?.() || {} })).json())
        .sections.dictation, opts.report);
    const panel = page.locator('#dictation-panel');

    let ok = await runStep(report, 'editor', async () => {
      await page.goto(`${opts.base}/reporting/study/${encodeURIComponent(opts.study)}`, { waitUntil: 'domcontentloaded' });
      await panel.locator('#dictation-record:enabled').waitFor();
    });
    ok = ok && await runStep(report, 'record', async () => {
      await page.evaluate(() => {
        const status = document.getElementById('dictation-status');
        new MutationObserver(() => {
          if (status.textContent.includes('Transcribing') && status.querySelector('.spinner')) window.sawTranscribing = true;
        }).observe(status, { childList: true, subtree: true, characterData: true });
      });
      await panel.locator('#dictation-record').click();
      await page.waitForSelector('#dictation-panel[data-state="recording"]');
      await page.waitForTimeout(opts['record-ms']);
      await panel.locator('#dictation-stop').click();
      await page.waitForSelector('#dictation-panel[data-state="transcribed"], #dictation-panel[data-state="failed"]',
        { timeout: Math.max(opts.timeout, 120000) });
      report.sawTranscribing = await page.evaluate(() => window.sawTranscribing === true);
      if (await panel.getAttribute('data-state') === 'failed') {
        throw new Error(await panel.locator('#dictation-status').innerText());
      }
      report.transcript = await panel.locator('#dictation-transcript').innerText();
      report.dictation = await dictation();
    });
    ok = ok && await runStep(report, 'play', async () => {
      const item = panel.locator('#dictation-recordings li[data-audio]').first();
      await item.locator('[data-play]').click();
      await panel.locator('#dictation-recordings li[data-bytes]').first().waitFor();
      report.audioBytes = Number(await item.getAttribute('data-bytes'));
    });
    ok = ok && await runStep(report, 'reject', async () => {
      await panel.locator('#dictation-reject').click();
      await panel.locator('#dictation-recordings li[data-status="rejected"]').waitFor();
      report.rejected = true;
      report.dictationAfterReject = await dictation();
      await page.screenshot({ path: join(opts.out, 'editor-dictation.png') }).catch(() => {});
    });
    ok = ok && await runStep(report, 'typing', async () => {
      await page.goto(`${opts.base}/reporting/typing`, { waitUntil: 'domcontentloaded' });
      const item = page.locator(`#typing-queue .typing-item[data-report="${opts.report}"]`);
      await page.locator(`#typing-queue .typing-item[data-report="${opts.report}"][data-bytes]`).waitFor();
      report.typingListed = true;
      report.typingBytes = Number(await item.getAttribute('data-bytes'));
      await page.screenshot({ path: join(opts.out, 'typing.png') }).catch(() => {});
      await item.locator('textarea').fill(opts.typed);
      await item.locator('[data-done]').click();
      await item.waitFor({ state: 'detached' });
      report.typedGone = true;
      report.dictationAfterTyping = await dictation();
      report.queueAfter = await page.evaluate(async () => (await (await fetch('/api/typing')).json()).queue);
    });
  } finally {
    await browser.close().catch(() => {});
  }
  finish(report, report.typedGone && report.sawTranscribing, opts.out);
}

main().catch(fatal);
