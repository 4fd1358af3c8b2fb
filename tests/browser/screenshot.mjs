// Makes the README's picture of a batch page (docs/console.png): a batch of 3,000 lines
// running against the mock upstream with some 429s and 400s, photographed mid-run.
//
//   scripts/browser-setup.sh && (cd tests/browser && npm run screenshot)
//
// Not a test: run it by hand when the batch page changes. OUT overrides the file written.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startMock, startServer, stopAll, launchBrowser, openPage, apiClient, chatLine } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const out = process.env.OUT || path.join(here, '..', '..', 'docs', 'console.png');

try {
  const mock = await startMock('--latency-ms', '120', '--rate-429', '0.03', '--retry-after-s', '0.5', '--seed', '7');
  const server = await startServer(`
[[tenants]]
name = "research"
api_keys = ["sk-demo"]

[[upstreams]]
name = "local-vllm"
base_url = "${mock}/v1"
models = ["*"]
max_concurrency = 24
`);
  const api = apiClient(server.url, 'sk-demo');
  const lines = Array.from({ length: 3000 }, (_, i) => chatLine(`req-${i}`,
    i % 97 === 5 ? { status: 400 } : i % 5 === 0 ? { completion_tokens: 24 + (i % 40) } : undefined));
  const b = await api.submit(lines, { metadata: { job: 'nightly-eval', owner: 'ana' } });
  const browser = await launchBrowser();
  const p = await openPage(browser, { width: 1280, height: 1180 });
  await p.page.goto(`${server.url}/`);
  await p.page.getByLabel('API key').fill('sk-demo');
  await p.page.getByLabel('API key').press('Enter');
  await p.page.getByRole('heading', { name: 'Batches', level: 1 }).waitFor();
  await p.page.goto(`${server.url}/batches/${b.id}`);
  await p.page.locator('.badge.st-in_progress').waitFor();
  await p.page.waitForTimeout(9000);
  await p.page.screenshot({ path: out });
  console.log(`wrote ${out}${p.errors.length ? `; browser errors: ${p.errors.join('; ')}` : ''}`);
  await browser.close();
} finally {
  stopAll();
}
