#!/usr/bin/env node
// Headless check that the bundled OHIF viewer shows a signed report's Encapsulated PDF ([report] encapsulated_pdf).
//
//   node report_pdf_check.mjs --base http://127.0.0.1:PORT --study <StudyInstanceUID> --out DIR [--timeout MS]
//
// Steps: 1. open BASE/viewer?StudyInstanceUIDs=<uid> and wait for the study browser's "Report PDF" series (modality
// DOC); 2. double-click it and wait for OHIF's PDF viewport (an <object type="application/pdf">); 3. read the PDF
// that the viewport holds (its blob: URL, fetched in the page): its first bytes and length. Prints ONE JSON line
// (lib.mjs): {"seriesListed", "viewportPdf", "pdfHead", "pdfBytes", "errors", "failedRequests", "consoleErrors"};
// exits 0 only when every step passed and no DICOMweb request failed.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { fatal, finish, launchOptions, parseArgs, runStep, watchPage } from './lib.mjs';

async function main() {
  const opts = parseArgs(process.argv.slice(2), { names: ['base', 'study', 'out', 'timeout'],
    required: ['base', 'study'], defaults: { timeout: 120000 } });
  const out = opts.out || mkdtempSync(join(tmpdir(), 'report-pdf-'));
  const report = { seriesListed: false, viewportPdf: false, pdfHead: '', pdfBytes: 0 };
  const browser = await chromium.launch(launchOptions([], { webgl: true }));
  const deadline = setTimeout(() => { report.errors = [...(report.errors || []), 'timed out']; browser.close(); },
    opts.timeout);
  try {
    // Only DICOMweb requests must succeed (the viewer's own optional files may be missing); console errors are
    // reported, not judged, as in viewer_check.mjs.
    const page = watchPage(await browser.newPage({ viewport: { width: 1400, height: 900 } }), report,
      { timeout: 60000, allow: url => !url.includes('/dicom-web') });
    await runStep(report, 'study browser lists the report PDF', async () => {
      await page.goto(`${opts.base}/viewer?StudyInstanceUIDs=${opts.study}`);
      await page.getByText('Report PDF').first().waitFor({ state: 'visible' });
      report.seriesListed = true;
    });
    await runStep(report, 'PDF viewport', async () => {
      await page.getByText('Report PDF').first().dblclick();
      const viewport = page.locator('object[type="application/pdf"]').first();
      await viewport.waitFor({ state: 'attached' });
      report.viewportPdf = true;
      const held = await viewport.evaluate(async element => {
        const bytes = new Uint8Array(await (await fetch(element.data)).arrayBuffer());
        return { head: String.fromCharCode(...bytes.slice(0, 5)), length: bytes.length };
      });
      report.pdfHead = held.head;
      report.pdfBytes = held.length;
      await page.screenshot({ path: join(out, 'report-pdf.png') });
    });
  } finally {
    clearTimeout(deadline);
    await browser.close();
  }
  finish(report, report.seriesListed && report.viewportPdf && report.pdfHead === '%PDF-', opts.out,
    { clean: ['errors', 'failedRequests'] });
  if (!opts.out) rmSync(out, { recursive: true, force: true });
}

main().catch(e => fatal(e, { seriesListed: false, viewportPdf: false }));
