#!/usr/bin/env node
// Headless check of Bastion's admin page (/admin): search, upload, health.
//
//   node admin_check.mjs --base http://127.0.0.1:PORT --out DIR
//        --search 'PATTERN*' --study <UID>                 (a stored study the search must list)
//        --upload FILE --upload-search 'PATTERN*' --upload-study <UID>   (a file to upload and find)
//        [--bad-upload FILE]                                (a non-DICOM file the upload must refuse)
//        [--copies N] [--repaired-key KEY]                  (the Copies panel: N stores; a finding of KEY repaired)
//        [--queue NAME]                                     (the Queues panel: NAME's dead letters, retried)
//        [--edge UPSTREAM]                                  (the Queues panel's edge line: backlog to UPSTREAM)
//        [--timeout MS]
//
// Uses Debian's /usr/bin/chromium (CHROMIUM_PATH overrides) with a fresh profile. Steps:
//   1. open BASE/admin and wait until the health panel says the DICOM listener is "up";
//   2. type --search into the patient-name field, submit, and wait for the row of --study, which must
//      hold an "open in viewer" link to /viewer?StudyInstanceUIDs=<study>;
//   3. give --upload to the file input (#files) and wait until the upload status says "1 stored, 0 failed";
//   4. search --upload-search and wait for the row of --upload-study;
//   5. with --bad-upload, upload that file and wait until the status says "0 stored, 1 failed" with a reason
//      (the STOW-RS answer to it, 409, is expected and not counted as a failed request);
//   6. with --copies, wait until the Copies panel lists N stores (their location and state go in the report, as
//      do its counts) and, with --repaired-key, a finding of that object whose "Repaired" cell holds a time;
//   7. with --queue, wait until the Queues panel's row of NAME shows a dead letter (its cells go in the report),
//      click its "retry" button and wait until the panel says they are pending again;
//   8. with --edge, wait until the Queues panel shows the edge line naming UPSTREAM and its backlog (its text goes
//      in the report as edgeLine).
// Prints ONE JSON line on stdout (also written to DIR/result.json):
//   {"healthUp":bool,"searchOk":bool,"viewerLink":str|null,"uploadOk":bool,"uploadStatus":str,
//    "uploadedFound":bool,"badUploadStatus":str,"failedRequests":[...],"consoleErrors":[...],"errors":[...],"timingsMs":{...}}
// and exits 0 only when every step passed, no request failed (status >= 400 or network error) and the
// page raised no error. Screenshots go to DIR.

import { join } from 'node:path';
import { fatal, finish, openBrowser, parseArgs, runStep, watchPage } from './lib.mjs';

const rowOf = (page, uid) => page.locator(`#results tbody tr[data-study="${uid}"]`);

async function search(page, pattern) {
  await page.fill('#search input[name="PatientName"]', pattern);
  await page.click('#search button[type="submit"]');
}

async function main() {
  const opts = parseArgs(process.argv.slice(2), {
    names: ['base', 'out', 'search', 'study', 'upload', 'upload-search', 'upload-study', 'bad-upload', 'copies',
      'repaired-key', 'queue', 'edge'],
    required: ['base', 'out', 'search', 'study', 'upload', 'upload-search', 'upload-study'],
    numbers: ['timeout', 'copies'],
  });
  const out = opts.out;
  const report = {
    healthUp: false,
    searchOk: false,
    viewerLink: null,
    uploadOk: false,
    uploadStatus: '',
    uploadedFound: false,
    badUploadStatus: null,
    failedRequests: [],
    consoleErrors: [],
    errors: [],
    timingsMs: {},
    copiesStores: null,
    copiesCounts: null,
    copiesRepaired: null,
    queueRow: null,
    queueRetried: null,
    edgeLine: null,
  };
  const started = Date.now();
  const step = async (name, fn) => {
    if (await runStep(report, name, fn)) report.timingsMs[name] = Date.now() - started;
  };

  // The bad upload's STOW-RS answer (409) is expected, and so is Chromium's console line for it.
  let expectRejection = false;
  const allow = (url, status) => expectRejection && status === 409 && new URL(url).pathname === '/dicom-web/studies';
  const browser = await openBrowser();
  try {
    const page = watchPage(await browser.newPage({ viewport: { width: 1280, height: 900 } }), report,
      { timeout: opts.timeout, allow });

    await step('health', async () => {
      await page.goto(`${opts.base}/admin`, { waitUntil: 'domcontentloaded' });
      const listener = page.locator('#health dt', { hasText: 'DICOM listener' }).locator('xpath=following-sibling::dd[1]');
      await listener.locator('.ok', { hasText: /^up$/ }).waitFor({ state: 'visible' });
      report.healthUp = true;
      report.headerScan = (await page.locator('#health dt', { hasText: 'Header scan' })
        .locator('xpath=following-sibling::dd[1]').textContent()).trim();
      report.fileWrite = (await page.locator('#health dt', { hasText: 'File write' })
        .locator('xpath=following-sibling::dd[1]').textContent()).trim();
      await page.locator('#remotes li').first().waitFor({ state: 'visible' });
      report.remotes = (await page.locator('#remotes li').allInnerTexts()).map(t => t.trim());
    });

    await step('search', async () => {
      await search(page, opts.search);
      const link = rowOf(page, opts.study).getByRole('link', { name: 'open in viewer' });
      await link.waitFor({ state: 'visible' });
      report.viewerLink = await link.getAttribute('href');
      const expected = `/viewer?StudyInstanceUIDs=${encodeURIComponent(opts.study)}`;
      if (report.viewerLink !== expected) throw new Error(`viewer link ${report.viewerLink}, expected ${expected}`);
      report.searchOk = true;
    });
    await page.screenshot({ path: join(out, 'admin-search.png'), fullPage: true }).catch(() => {});

    await step('upload', async () => {
      await page.setInputFiles('#files', opts.upload);
      const status = page.locator('#upload-status');
      await status.getByText(/\bstored\b/).waitFor({ state: 'visible' });
      report.uploadStatus = (await status.innerText()).trim();
      if (!/\b1 stored, 0 failed\b/.test(report.uploadStatus)) throw new Error(`upload status: ${report.uploadStatus}`);
      report.uploadOk = true;
    });

    await step('find uploaded', async () => {
      await search(page, opts['upload-search']);
      await rowOf(page, opts['upload-study']).waitFor({ state: 'visible' });
      report.uploadedFound = true;
    });
    await page.screenshot({ path: join(out, 'admin-upload.png'), fullPage: true }).catch(() => {});

    if (opts['bad-upload']) {
      await step('bad upload', async () => {
        expectRejection = true;
        await page.setInputFiles('#files', opts['bad-upload']);
        const status = page.locator('#upload-status');
        await status.getByText(/0 stored, 1 failed/).waitFor({ state: 'visible' });
        report.badUploadStatus = (await status.innerText()).trim();
      });
      await page.screenshot({ path: join(out, 'admin-bad-upload.png'), fullPage: true }).catch(() => {});
    }

    if (opts.copies) {
      await step('copies', async () => {
        const rows = page.locator('#copy-stores tbody tr');
        await page.waitForFunction(n => document.querySelectorAll('#copy-stores tbody tr').length === n, opts.copies);
        report.copiesStores = [];
        for (let i = 0; i < await rows.count(); i++) {
          const cells = rows.nth(i).locator('td');
          report.copiesStores.push({ location: await rows.nth(i).getAttribute('data-store'),
            state: (await cells.nth(1).innerText()).trim(), wanting: (await cells.nth(3).innerText()).trim() });
        }
        report.copiesCounts = (await page.locator('#copy-counts').innerText()).trim();
        report.copiesScrub = (await page.locator('#copy-scrub').innerText()).trim();
        if (opts['repaired-key']) {
          // The page refreshes every 5 s: wait for the row of the object with its repair's time.
          const row = page.locator(`#copy-findings tbody tr[data-key="${opts['repaired-key']}"]`);
          await row.locator('td.ok').first().waitFor({ state: 'visible' });
          const cells = row.first().locator('td');
          report.copiesRepaired = { problem: (await cells.nth(3).innerText()).trim(),
            store: await cells.nth(2).getAttribute('title'), repaired: (await cells.nth(4).innerText()).trim() };
        }
      });
      await page.locator('#copies').screenshot({ path: join(out, 'admin-copies.png') }).catch(() => {});
    }

    if (opts.queue) {
      await step('queues', async () => {
        // The panel refreshes every 2 s: wait for the destination's row with a dead letter and its retry button.
        const row = page.locator(`#queue-list tbody tr[data-queue="${opts.queue}"]`);
        await row.locator('button[data-retry]').waitFor({ state: 'visible' });
        const cells = row.locator('td');
        const text = async i => (await cells.nth(i).innerText()).trim();
        report.queueRow = { pending: await text(1), inFlight: await text(2), delivered: await text(3),
          dead: await text(4), lastError: await text(6) };
        await page.locator('#queue-list').screenshot({ path: join(out, 'admin-queues.png') }).catch(() => {});
        await row.locator('button[data-retry]').click();
        await page.locator('#queue-status', { hasText: 'pending again' }).waitFor({ state: 'visible' });
        report.queueRetried = (await page.locator('#queue-status').innerText()).trim();
      });
    }
    if (opts.edge) {
      await step('edge', async () => {
        await page.locator('#edge', { hasText: `Edge of ${opts.edge}: backlog` }).waitFor({ state: 'visible' });
        report.edgeLine = (await page.locator('#edge').innerText()).trim();
      });
    }
  } finally {
    await browser.close().catch(() => {});
  }

  const passed = report.healthUp && report.searchOk && report.uploadOk && report.uploadedFound &&
    (!opts.copies || report.copiesStores !== null) && (!opts['repaired-key'] || report.copiesRepaired !== null) &&
    (!opts.queue || report.queueRetried !== null) && (!opts.edge || report.edgeLine !== null);
  finish(report, passed, out);
}

main().catch(fatal);
