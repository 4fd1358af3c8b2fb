// End-to-end tests of the web console in headless Chromium against the real binary and the
// project's mock upstream. Each test opens a fresh browser context and fails on any console
// or page error it did not provoke. Screenshots go to the output dir (git-ignored).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import {
  startMock, startServer, stopAll, launchBrowser, openPage, assertNoErrors, apiClient, chatLine, jsonl, OUTPUT,
} from './harness.mjs';

const TENANTS = `
[[tenants]]
name = "team-a"
api_keys = ["sk-a"]

[[tenants]]
name = "team-b"
api_keys = ["sk-b"]
`;

let browser;
let mockUrl;
let server;
let apiA;
const state = {};

before(async () => {
  mockUrl = await startMock('--latency-ms', '60');
  server = await startServer(`
[[upstreams]]
name = "mock"
base_url = "${mockUrl}/v1"
models = ["*"]
max_concurrency = 4

[batches]
completion_windows = ["24h", "1h"]
${TENANTS}`);
  apiA = apiClient(server.url, 'sk-a');
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  stopAll();
});

async function signIn(page, key) {
  await page.goto(`${server.url}/`);
  await page.getByLabel('API key').fill(key);
  await page.getByLabel('API key').press('Enter');
  await page.getByRole('heading', { name: 'Batches', level: 1 }).waitFor();
}

/** The number shown in the batch page's stat box `label`. */
async function stat(page, label) {
  const text = await page.locator(`dd[data-stat="${label}"]`).textContent();
  return Number(text.replace(/,/g, ''));
}

test('without tenants the console opens with no sign-in', async () => {
  const open = await startServer(`
[[upstreams]]
name = "mock"
base_url = "${mockUrl}/v1"
models = ["*"]
`);
  const p = await openPage(browser);
  await p.page.goto(`${open.url}/`);
  await p.page.getByRole('heading', { name: 'Batches', level: 1 }).waitFor();
  assert.equal(await p.page.getByLabel('API key').count(), 0, 'no sign-in form');
  assert.equal(await p.page.locator('.tenant').textContent(), 'default');
  await p.page.getByText('No batches yet.').waitFor();
  assertNoErrors(assert, p);
  await p.close();
});

test('sign in, see a bad line by number, create from a good file, watch it complete, download', async () => {
  const p = await openPage(browser);
  const { page } = p;
  await page.goto(`${server.url}/`);
  // A wrong key is refused with a message; the right one signs in (Enter submits).
  p.expectHttpError('/console/config', 401);
  await page.getByLabel('API key').fill('sk-wrong');
  await page.getByLabel('API key').press('Enter');
  await page.getByText('That key is not valid on this server.').waitFor();
  await page.getByLabel('API key').fill('sk-a');
  await page.getByLabel('API key').press('Enter');
  await page.getByRole('heading', { name: 'Batches', level: 1 }).waitFor();
  assert.equal(await page.locator('.tenant').textContent(), 'team-a');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('batchd.apiKey')), 'sk-a', 'the key is kept for this tab');

  await page.getByRole('link', { name: 'New batch' }).first().click();
  await page.getByRole('heading', { name: 'New batch' }).waitFor();
  const bad = jsonl([chatLine('a'), chatLine('b'), '{"custom_id": "c", "method": "POST"', chatLine('d'),
    JSON.stringify({ custom_id: 'e', method: 'POST', url: '/v1/chat/completions', body: { model: 'm', stream: true } })]);
  await page.setInputFiles('#file', { name: 'bad.jsonl', mimeType: 'application/jsonl', buffer: Buffer.from(bad) });
  await page.locator('#invalid').waitFor();
  const rows = await page.locator('#validation-errors tbody tr').evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  assert.deepEqual(rows.map((r) => [r[0], r[1]]), [['3', 'invalid_json_line'], ['5', 'unsupported_value']], JSON.stringify(rows));
  assert.ok(await page.locator('#create').isDisabled(), 'nothing can be created from a bad file');
  assert.equal((await apiA.get('/batches')).data.length, 0, 'validation created no batch');

  // A good file, dropped on the drop zone: 200 lines of which 3 fail upstream (400).
  const lines = Array.from({ length: 200 }, (_, i) => chatLine(`req-${i}`, [7, 70, 170].includes(i) ? { status: 400 } : undefined));
  const dt = await page.evaluateHandle((text) => {
    const d = new DataTransfer();
    d.items.add(new File([text], 'good.jsonl', { type: 'application/jsonl' }));
    return d;
  }, jsonl(lines));
  await page.dispatchEvent('#drop', 'drop', { dataTransfer: dt });
  await page.locator('#valid').waitFor();
  assert.match(await page.locator('#valid').textContent(), /200 requests/);
  await page.getByLabel('Completion window').selectOption('1h');
  await page.getByLabel('Priority (1–8)').fill('3');
  await page.getByLabel('Metadata').fill('job=console-e2e\nowner=ana');
  await page.locator('#create').click();

  // The batch page follows it live to the end.
  await page.waitForURL(/\/batches\/batch_/);
  const id = decodeURIComponent(new URL(page.url()).pathname.split('/').pop());
  state.completedId = id;
  await page.locator('h1', { hasText: id }).waitFor();
  await page.locator('.badge.st-completed').waitFor({ timeout: 60_000 });
  await page.locator('.live', { hasText: 'ended' }).waitFor();
  const b = await apiA.get(`/batches/${id}`);
  assert.equal(b.status, 'completed');
  assert.equal(b.completion_window, '1h');
  assert.deepEqual(b.metadata, { job: 'console-e2e', owner: 'ana' });
  const rc = b.request_counts;
  assert.deepEqual(rc, { total: 200, completed: 197, failed: 3 });
  assert.equal(await stat(page, 'Succeeded'), rc.completed);
  assert.equal(await stat(page, 'Failed'), rc.failed);
  assert.equal(await stat(page, 'Total'), rc.total);
  assert.ok(await page.locator('.timeline [data-step="completed"]').isVisible());
  assert.ok(await page.locator('.chart canvas').count() > 0, 'the throughput chart is drawn');

  // Errors grouped by code and status, with an example line.
  await page.getByText('3 failed lines in 1 group.').waitFor();
  const groups = await page.locator('#error-groups tbody tr').evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  assert.equal(groups.length, 1, JSON.stringify(groups));
  assert.equal(groups[0][0], '400');
  assert.equal(groups[0][2], '3');
  assert.match(groups[0][3], /^req-(7|70|170) /);

  // Download the output: its lines are the completed ones.
  const [download] = await Promise.all([page.waitForEvent('download'), page.locator('#dl-output').click()]);
  assert.equal(download.suggestedFilename(), `${id}_output.jsonl`);
  const out = readFileSync(await download.path(), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  assert.equal(out.length, rc.completed);
  assert.ok(out.every((l) => l.response.status_code === 200));

  // Download the errors: exactly the three lines that failed upstream, with their 400s.
  const [errDownload] = await Promise.all([page.waitForEvent('download'), page.locator('#dl-errors').click()]);
  assert.equal(errDownload.suggestedFilename(), `${id}_errors.jsonl`);
  const errs = readFileSync(await errDownload.path(), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(errs.map((l) => l.custom_id).sort(), ['req-170', 'req-7', 'req-70'], JSON.stringify(errs));
  assert.ok(errs.every((l) => l.response.status_code === 400), 'each with its upstream answer');

  // Look one request up by custom_id.
  await page.getByRole('textbox', { name: 'custom_id' }).fill('req-70');
  await page.getByRole('textbox', { name: 'custom_id' }).press('Enter');
  await page.locator('.lookup-summary', { hasText: 'line 71' }).waitFor();
  assert.match(await page.locator('.lookup-summary').textContent(), /400/);

  await page.locator('.toast').waitFor({ state: 'detached', timeout: 10_000 });
  await page.screenshot({ path: path.join(OUTPUT, 'batch-page.png'), fullPage: true });

  // Retry the failed lines: a new batch, linked.
  await page.locator('#retry').click();
  await page.locator('#retry-link').waitFor();
  const retryId = await page.locator('#retry-link').textContent();
  state.retryId = retryId;
  await page.locator('#retry-link').click();
  await page.waitForURL(new RegExp(`/batches/${retryId}$`));
  const rb = await apiA.get(`/batches/${retryId}`);
  assert.equal(rb.metadata.retry_of, id);
  assert.equal(rb.request_counts.total === 0 || rb.request_counts.total === 3, true, JSON.stringify(rb.request_counts));
  await page.getByRole('link', { name: id }).waitFor();
  assertNoErrors(assert, p);
  await p.close();
});

test('cancel a running batch, with its ETA and upstream shown; its input file is deleted only once it ended; dialogs keep focus', async () => {
  // Four lines at a time answer every 0.75 s: a rate (so an ETA) for half a minute.
  const lines = Array.from({ length: 160 }, (_, i) => chatLine(`slow-${i}`, { latency_ms: 750 }));
  const b = await apiA.submit(lines, { metadata: { job: 'to-cancel' } });
  const p = await openPage(browser);
  const { page } = p;
  await signIn(page, 'sk-a');

  // The file a running batch reads: the server's 409 message is shown.
  await page.getByRole('link', { name: 'Files', exact: true }).click();
  await page.locator('#files-table').waitFor();
  p.expectHttpError(`/v1/files/${b.input_file_id}`, 409);
  await page.locator(`button[data-file="${b.input_file_id}"]`).click();
  await page.getByRole('dialog').getByRole('button', { name: 'Delete file' }).click();
  const msg = page.locator('#files-status [role="alert"]');
  await msg.waitFor();
  assert.match(await msg.textContent(), /Not deleted: .*(batch|running|in use)/i);
  assert.ok(await page.locator(`button[data-file="${b.input_file_id}"]`).isVisible(), 'the file is still listed');

  await page.goto(`${server.url}/batches/${b.id}`);
  await page.locator('.badge.st-in_progress').waitFor();
  await page.locator('.live', { hasText: 'live' }).waitFor();

  // While it runs: an ETA, and the upstream serving it with its window and limit.
  const eta = page.locator('dd[data-stat="ETA"]');
  await page.waitForFunction(() => /^\d+ (s|min|h|d)/.test(document.querySelector('dd[data-stat="ETA"]')?.textContent || ''));
  assert.match(await eta.textContent(), /^\d+ (s|min|h|d)/);
  const upstream = page.locator('tr', { has: page.locator('td[data-label="Upstream"]', { hasText: 'mock' }) });
  await upstream.waitFor();
  const windowShown = Number((await upstream.locator('td[data-label="Window"]').textContent()).replace(/,/g, ''));
  assert.ok(windowShown > 0 && windowShown <= 4, `the window, within the upstream's max_concurrency: ${windowShown}`);
  assert.equal(await upstream.locator('td[data-label="Limit"]').textContent(), '4');
  const progress = await apiA.get(`/batches/${b.id}/progress`);
  assert.deepEqual(progress.upstreams.map((u) => u.name), ['mock'], JSON.stringify(progress.upstreams));

  // Keyboard: Enter on the focused Cancel opens a modal whose focus cannot leave it; Escape keeps the batch.
  await page.locator('#cancel').focus();
  assert.notEqual(await page.locator('#cancel').evaluate((el) => getComputedStyle(el).outlineStyle), 'none', 'focus is visible');
  await page.keyboard.press('Enter');
  const dialog = page.getByRole('dialog');
  await dialog.waitFor();
  for (let i = 0; i < 5; i++) {
    await page.keyboard.press('Tab');
    assert.ok(await page.evaluate(() => !!document.activeElement.closest('dialog')), 'focus stays in the dialog');
  }
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'detached' });
  assert.equal((await apiA.get(`/batches/${b.id}`)).status, 'in_progress', 'Escape cancels nothing');

  await page.locator('#cancel').click();
  await dialog.getByRole('button', { name: 'Cancel batch' }).click();
  await page.locator('.badge.st-cancelled').waitFor({ timeout: 30_000 });
  const after = await apiA.get(`/batches/${b.id}`);
  assert.equal(after.status, 'cancelled');
  assert.equal(await stat(page, 'Total'), after.request_counts.total);
  assert.ok(await page.locator('.timeline [data-step="cancelled"]').isVisible());
  assert.equal(await eta.textContent(), '—', 'no ETA once it ended');

  // Now that the batch ended its input file can be deleted: the row goes, the API agrees.
  await page.getByRole('link', { name: 'Files', exact: true }).click();
  const del = page.locator(`button[data-file="${b.input_file_id}"]`);
  await del.click();
  const [deleted] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'DELETE' && r.url().endsWith(`/v1/files/${b.input_file_id}`)),
    page.getByRole('dialog').getByRole('button', { name: 'Delete file' }).click(),
  ]);
  assert.deepEqual(await deleted.json(), { id: b.input_file_id, object: 'file', deleted: true });
  await del.waitFor({ state: 'detached' });
  const gone = await fetch(`${server.url}/v1/files/${b.input_file_id}`, { headers: { Authorization: 'Bearer sk-a' } });
  assert.equal(gone.status, 404, 'the API no longer has the file');
  assert.ok(!(await apiA.get('/files')).data.some((f) => f.id === b.input_file_id));
  assertNoErrors(assert, p);
  await p.close();
});

test('filter by status and search by metadata value', async () => {
  const p = await openPage(browser);
  const { page } = p;
  await signIn(page, 'sk-a');
  await page.getByLabel('Status').selectOption('cancelled');
  await page.waitForURL(/status=cancelled/);
  await page.locator('tr[data-status="cancelled"]').first().waitFor();
  assert.equal(await page.locator('tbody tr:not([data-status="cancelled"])').count(), 0);
  await page.getByLabel('Status').selectOption('');
  await page.getByLabel('Search').fill('console-e2e');
  await page.getByLabel('Search').press('Enter');
  await page.waitForURL(/search=console-e2e/);
  await page.locator(`tr[data-id="${state.completedId}"]`).waitFor();
  const ids = await page.locator('table.batches tbody tr').evaluateAll((trs) => trs.map((tr) => tr.dataset.id));
  assert.deepEqual(ids, [state.retryId, state.completedId], 'the batch and its retry (which keeps its metadata), newest first');
  assertNoErrors(assert, p);
  await p.close();
});

test("tenant B's key shows none of tenant A's batches or files", async () => {
  assert.ok(state.completedId, 'tenant A has a batch');
  const p = await openPage(browser);
  const { page } = p;
  await signIn(page, 'sk-b');
  assert.equal(await page.locator('.tenant').textContent(), 'team-b');
  await page.getByText('No batches yet.').waitFor();
  assert.equal(await page.locator('table.batches').count(), 0);
  await page.getByLabel('Search').fill(state.completedId);
  await page.getByLabel('Search').press('Enter');
  await page.getByText('No batch matches this filter.').waitFor();
  p.expectHttpError(`/v1/batches/${state.completedId}`, 404);
  await page.goto(`${server.url}/batches/${state.completedId}`);
  await page.getByRole('heading', { name: 'Batch not found' }).waitFor();
  await page.getByRole('link', { name: 'Files', exact: true }).click();
  await page.getByText('No files yet.').waitFor();
  assertNoErrors(assert, p);
  await p.close();
});

test('phone width: every view fits without horizontal scrolling', async () => {
  const p = await openPage(browser, { width: 390, height: 844 });
  const { page } = p;
  await signIn(page, 'sk-a');
  const overflow = () => page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.equal(await overflow(), 0, 'batches list');
  await page.goto(`${server.url}/batches/${state.completedId}`);
  await page.locator('.badge.st-completed').waitFor();
  await page.locator('#error-groups').waitFor();
  assert.equal(await overflow(), 0, 'batch page');
  await page.screenshot({ path: path.join(OUTPUT, 'batch-page-phone.png'), fullPage: true });
  for (const [link, ready] of [['New batch', '#drop'], ['Files', '#files-table']]) {
    await page.getByRole('link', { name: link, exact: true }).first().click();
    await page.locator(ready).waitFor();
    assert.equal(await overflow(), 0, link);
  }
  assertNoErrors(assert, p);
  await p.close();
});

test('without its event stream the page polls, and a stalled batch says why and is at risk', async () => {
  const port = await new Promise((resolve) => {
    const srv = createServer().listen(0, '127.0.0.1', () => { const { port: p } = srv.address(); srv.close(() => resolve(p)); });
  });
  const dead = await startServer(`
[[upstreams]]
name = "gone"
base_url = "http://127.0.0.1:${port}/v1"
models = ["*"]
max_attempts = 100

[batches]
stall_after_s = 3
completion_windows = ["24h", "20s"]
`);
  // Stalled within ten stall periods of its expiry: also at risk.
  const b = await apiClient(dead.url).submit([chatLine('s-1'), chatLine('s-2')], { completion_window: '20s' });
  const p = await openPage(browser);
  const { page } = p;
  await page.route('**/events*', (route) => route.abort());
  p.expectHttpError('/events', 'net::ERR_FAILED');
  await page.goto(`${dead.url}/batches/${b.id}`);
  await page.locator('.live', { hasText: 'polling' }).waitFor();
  const stalled = page.locator('.stalled');
  await stalled.waitFor({ timeout: 30_000 });
  assert.match(await stalled.textContent(), /Stalled since .*unreachable.*gone/);
  assert.match(await page.locator('.at-risk').textContent(), /At risk: it may not finish before it expires/);
  await page.locator('td', { hasText: 'could not connect' }).first().waitFor();
  assertNoErrors(assert, p);
  await p.close();
});

test('a stream that ends at its lifetime is resumed: the page stays live to the end', async () => {
  const short = await startServer(`
[server]
stream_lifetime_s = 1

[[upstreams]]
name = "mock"
base_url = "${mockUrl}/v1"
models = ["*"]
max_concurrency = 1
`);
  const lines = [1, 2, 3, 4].map((i) => chatLine(`life-${i}`, { latency_ms: 900 }));
  const b = await apiClient(short.url).submit(lines);
  const p = await openPage(browser);
  const { page } = p;
  await page.addInitScript(() => {
    window.liveTexts = [];
    new MutationObserver(() => {
      const t = document.querySelector('.live')?.textContent;
      if (t && window.liveTexts.at(-1) !== t) window.liveTexts.push(t);
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });
  const streams = [];
  page.on('request', (r) => { if (new URL(r.url()).pathname.endsWith('/events')) streams.push(r.url()); });
  await page.goto(`${short.url}/batches/${b.id}`);
  await page.locator('.live', { hasText: 'ended' }).waitFor({ timeout: 30_000 });
  assert.equal(await stat(page, 'Succeeded'), 4);
  const live = await page.evaluate(() => window.liveTexts);
  assert.ok(streams.length >= 2, `the page followed ${streams.length} stream(s): ${streams}`);
  assert.ok(!live.includes('polling'), `the page fell back to polling: ${live}`);
  assertNoErrors(assert, p);
  await p.close();
});

test('desktop width: cells break between words only, the chart speaks ISO, a finished batch says how long it took, a pause reads cleanly, not-found without keys', async () => {
  const refusing = await startMock('--rate-429', '1', '--retry-after-s', '30');
  const open = await startServer(`
[[upstreams]]
name = "mock"
base_url = "${mockUrl}/v1"
models = ["m"]

[[upstreams]]
name = "limited"
base_url = "${refusing}/v1"
models = ["busy"]
`);
  const api = apiClient(open.url, null);
  const done = await api.submit(Array.from({ length: 40 }, (_, i) => chatLine(`r-${i}`, { latency_ms: 1500 })), { metadata: { job: 'desktop-width' } });
  for (let i = 0; i < 300 && (await api.get(`/batches/${done.id}`)).status !== 'completed'; i += 1) await new Promise((r) => setTimeout(r, 100));
  // Eight lines: a cluster of 429s is the pool's limit (one alone would only delay its line).
  const busyLine = (i) => JSON.stringify({ custom_id: `x-${i}`, method: 'POST', url: '/v1/chat/completions', body: { model: 'busy', messages: [{ role: 'user', content: 'hi' }] } });
  const busy = await api.submit(Array.from({ length: 8 }, (_, i) => busyLine(i)));

  const p = await openPage(browser, { width: 1280 });
  const { page } = p;
  await page.goto(`${open.url}/`);
  await page.locator('table.batches tbody tr').nth(1).waitFor();
  // Every endpoint and every date in the list is on one line (one client rect each).
  const broken = await page.evaluate(() => [...document.querySelectorAll('table.batches td time, table.batches td .mono')]
    .filter((el) => el.getClientRects().length !== 1).map((el) => el.textContent));
  assert.deepEqual(broken, [], 'no endpoint or date breaks across lines at 1280 px');
  const endpoint = await page.locator('table.batches td .mono', { hasText: '/v1/chat/completions' }).first().textContent();
  assert.equal(endpoint, '/v1/chat/completions');

  // The finished batch: how long it took and its average rate, next to the counts.
  await page.goto(`${open.url}/batches/${done.id}`);
  await page.locator('.badge.st-completed').waitFor();
  const took = await page.locator('dd[data-stat="Took"]').textContent();
  assert.match(took, /^\d+ (s|min)/, took);
  assert.match(await page.locator('dd[data-stat="Average"]').textContent(), /^[\d.,]+ req\/s$/);
  // The chart's time axis in ISO form (HH:MM:SS by the second, HH:MM by the minute, the date by the day).
  const ticks = await page.evaluate(async () => {
    const { isoTicks } = await import('/assets/chart.js');
    const t = Date.UTC(2026, 11, 7, 12, 0, 5) / 1000;
    return [isoTicks(null, [t], 0, 5)[0], isoTicks(null, [t], 0, 60)[0], isoTicks(null, [t], 0, 86400)[0]];
  });
  assert.match(ticks[0], /^\d\d:\d\d:05$/);
  assert.match(ticks[1], /^\d\d:\d\d$/);
  assert.match(ticks[2], /^2026-12-0[78]$/);

  // A paused upstream: reason, until when, and what the upstream said, once each.
  await page.goto(`${open.url}/batches/${busy.id}`);
  const pause = page.locator('.pause');
  await pause.waitFor({ timeout: 30_000 });
  const text = await pause.textContent();
  assert.match(text, /^yes: rate limited until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d/, text);
  assert.ok(!/from upstream;|trying again in|\)\./.test(text), `no server tail or doubled text: ${text}`);
  assert.equal((text.match(/429/g) || []).length <= 1, true, text);
  await api.post(`/batches/${busy.id}/cancel`, {});

  // Not found, on a server without keys: no word of a key.
  p.expectHttpError('/v1/batches/batch_nosuch', 404);
  await page.goto(`${open.url}/batches/batch_nosuch`);
  await page.getByRole('heading', { name: 'Batch not found' }).waitFor();
  const nf = await page.locator('main p').first().textContent();
  assert.match(nf, /There is no batch batch_nosuch on this server\./);
  assertNoErrors(assert, p);
  await p.close();
});
