// Helpers for the console's browser tests: start the real `batchd` binary (server and mock
// upstream) on random ports, drive Debian's Chromium through playwright-core, and fail a
// test on any browser console error or page error it did not expect.
//
//   BATCHD_BIN   the binary (default: $CARGO_TARGET_DIR or <repo>/target, then debug/batchd)
//   CHROMIUM     the browser (default: /usr/bin/chromium)
//   BROWSER_OUTPUT  where screenshots and logs go (default: tests/browser/output)

import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, createWriteStream, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../..');
export const BIN = process.env.BATCHD_BIN || path.join(process.env.CARGO_TARGET_DIR || path.join(repo, 'target'), 'debug', 'batchd');
export const OUTPUT = process.env.BROWSER_OUTPUT || path.join(here, 'output');
mkdirSync(OUTPUT, { recursive: true });

const children = [];

/** Spawns `args`, resolves with the URL printed after `prefix` on stdout. */
function start(name, args, prefix, dir) {
  return new Promise((resolve, reject) => {
    const log = path.join(dir, `${name}.log`);
    const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, BATCHD_LOG: 'batchd=info' } });
    children.push(child);
    child.stderr.pipe(createWriteStream(log));
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${name} did not start within 60 s; log: ${log}`)), 60_000);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(new RegExp(`${prefix}(http://\\S+)`));
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      let tail = '';
      try { tail = readFileSync(log, 'utf8').slice(-2000); } catch { /* no log */ }
      reject(new Error(`${name} exited with ${code} before it was ready:\n${tail}`));
    });
  });
}

/** The project's mock upstream. */
export async function startMock(...args) {
  const dir = mkdtempSync(path.join(tmpdir(), 'batchd-browser-'));
  return start('mock-upstream', ['mock-upstream', '--listen', '127.0.0.1:0', ...args], 'mock-upstream listening on ', dir);
}

/** `batchd serve` with `toml` as its configuration, in a fresh data directory. */
export async function startServer(toml) {
  const dir = mkdtempSync(path.join(tmpdir(), 'batchd-browser-'));
  writeFileSync(path.join(dir, 'batchd.toml'), toml);
  const url = await start('batchd', ['serve', '--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'data'), '--config', path.join(dir, 'batchd.toml')], 'batchd listening on ', dir);
  return { url, dir };
}

export function stopAll() {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
}

/** Headless Chromium, as the project runs it (a fresh profile directory per launch). */
export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic'],
  });
}

/**
 * A page in a fresh context (fresh sessionStorage) that records every console error and page
 * error. `expectHttpError(urlPart, status)` accepts the one console line Chromium writes for
 * a fetch answered with that status (a 404 the test provokes), or failed with that network
 * error (a string such as 'net::ERR_FAILED'); `assertNoErrors()` fails on anything else.
 */
export async function openPage(browser, { width = 1280, height = 900 } = {}) {
  const context = await browser.newContext({ viewport: { width, height }, acceptDownloads: true });
  const page = await context.newPage();
  const errors = [];
  const expected = [];
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const url = msg.location().url || '';
    const i = expected.findIndex((e) => url.includes(e.urlPart) && msg.text().includes(e.what));
    if (i >= 0) { expected.splice(i, 1); return; }
    errors.push(`console.error: ${msg.text()} (${url})`);
  });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.setDefaultTimeout(20_000);
  return {
    page,
    context,
    expectHttpError(urlPart, status) { expected.push({ urlPart, what: typeof status === 'number' ? `status of ${status}` : status }); },
    errors,
    async close() { await context.close(); },
  };
}

/** The browser-side errors so far must be none. */
export function assertNoErrors(assert, p) {
  assert.deepEqual(p.errors, [], 'the browser console has no errors');
}

/** A small client of the same API, to compare what the console shows with what it says. */
export function apiClient(base, key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const call = async (method, p, body) => {
    const init = { method, headers: { ...headers } };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) { init.body = JSON.stringify(body); init.headers['Content-Type'] = 'application/json'; }
    const r = await fetch(`${base}/v1${p}`, init);
    const v = await r.json();
    if (!r.ok) throw new Error(`${method} ${p}: ${r.status} ${JSON.stringify(v)}`);
    return v;
  };
  return {
    get: (p) => call('GET', p),
    post: (p, body) => call('POST', p, body),
    async upload(text, name = 'input.jsonl') {
      const form = new FormData();
      form.append('purpose', 'batch');
      form.append('file', new Blob([text]), name);
      return call('POST', '/files', form);
    },
    async submit(lines, extra = {}) {
      const f = await this.upload(jsonl(lines));
      return this.post('/batches', { input_file_id: f.id, endpoint: '/v1/chat/completions', completion_window: '24h', ...extra });
    },
  };
}

export function chatLine(customId, mock) {
  const body = { model: 'm', messages: [{ role: 'user', content: `hello from ${customId}` }] };
  if (mock) body.mock = mock;
  return JSON.stringify({ custom_id: customId, method: 'POST', url: '/v1/chat/completions', body });
}

export const jsonl = (lines) => `${lines.join('\n')}\n`;
