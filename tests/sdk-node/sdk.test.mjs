// The official openai Node SDK (pinned in package.json) against the real batchd binary and the
// project's mock upstream: every files and batches method once, with their answers checked.
//
//   BATCHD_BIN=target/debug/batchd npm test     (scripts/node-sdk-test.sh does the npm ci)
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI, { toFile, NotFoundError, BadRequestError } from "openai";

const BIN = process.env.BATCHD_BIN ?? "../../target/debug/batchd";
const procs = [];
const dirs = [];

/** Spawns `batchd ARGS` and resolves with the URL of its "… listening on URL" line. */
function start(args, ready) {
  const env = { ...process.env };
  for (const k of ["BATCHD_UPSTREAM", "BATCHD_CONFIG", "OPENAI_BASE_URL", "OPENAI_API_KEY", "BATCHD_LISTEN", "BATCHD_DATA_DIR"]) delete env[k];
  const dir = mkdtempSync(join(tmpdir(), "batchd-node-"));
  dirs.push(dir);
  const p = spawn(BIN, args, { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  procs.push(p);
  let log = "";
  p.stderr.on("data", (d) => (log += d));
  return new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`no "${ready}" line from batchd ${args.join(" ")}:\n${log}`)), 20000);
    p.stdout.on("data", (d) => {
      out += d;
      const m = out.match(new RegExp(`${ready} (http://\\S+)`));
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    p.on("exit", (code) => reject(new Error(`batchd ${args.join(" ")} exited with ${code}:\n${log}`)));
  });
}

async function server(extra) {
  const dir = mkdtempSync(join(tmpdir(), "batchd-node-data-"));
  dirs.push(dir);
  const url = await start(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir, ...extra], "batchd listening on");
  return new OpenAI({ baseURL: `${url}/v1`, apiKey: "sk-unused", maxRetries: 3 });
}

let client;
before(async () => {
  const mock = await start(["mock-upstream", "--listen", "127.0.0.1:0", "--latency-ms", "5"], "mock-upstream listening on");
  client = await server(["--upstream", `${mock}/v1`]);
});
after(() => {
  for (const p of procs) p.kill("SIGTERM");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const line = (id, extra = {}) =>
  JSON.stringify({ custom_id: id, method: "POST", url: "/v1/chat/completions", body: { model: "gpt-4o-mini", messages: [{ role: "user", content: `hello from ${id}` }], ...extra } });
const jsonl = (n, extra) => Array.from({ length: n }, (_, i) => line(`req-${i}`, extra)).join("\n") + "\n";
const upload = async (text, name = "in.jsonl") => client.files.create({ file: await toFile(Buffer.from(text), name), purpose: "batch" });

async function until(batchId, statuses, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const b = await client.batches.retrieve(batchId);
    if (statuses.includes(b.status)) return b;
    assert.ok(Date.now() < deadline, `batch ${batchId} still ${b.status}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

test("files: create, retrieve, list (paged), content, waitForProcessing, delete", async () => {
  const text = jsonl(3);
  const f = await upload(text, "three.jsonl");
  assert.equal(f.object, "file");
  assert.equal(f.purpose, "batch");
  assert.equal(f.filename, "three.jsonl");
  assert.equal(f.bytes, Buffer.byteLength(text));
  const again = await client.files.retrieve(f.id);
  assert.deepEqual({ id: again.id, bytes: again.bytes }, { id: f.id, bytes: f.bytes });
  assert.equal((await client.files.waitForProcessing(f.id, { pollInterval: 100 })).id, f.id);
  assert.equal(await (await client.files.content(f.id)).text(), text, "the bytes come back as sent");

  const more = [await upload(jsonl(1), "a.jsonl"), await upload(jsonl(1), "b.jsonl")];
  const seen = [];
  for await (const x of client.files.list({ limit: 1, purpose: "batch" })) seen.push(x.id);
  for (const x of [f, ...more]) assert.ok(seen.includes(x.id), `list pages through to ${x.id}: ${seen}`);
  assert.equal(new Set(seen).size, seen.length, "no file listed twice across pages");

  const del = await client.files.delete(more[0].id);
  assert.deepEqual({ id: del.id, deleted: del.deleted }, { id: more[0].id, deleted: true });
  await assert.rejects(client.files.retrieve(more[0].id), (e) => e instanceof NotFoundError && e.status === 404 && typeof e.error?.message === "string");
});

test("batches: create, retrieve, list (paged), the output through files.content", async () => {
  const f = await upload(jsonl(20));
  const b = await client.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions", completion_window: "24h", metadata: { run: "node" } });
  assert.equal(b.object, "batch");
  assert.equal(b.input_file_id, f.id);
  assert.deepEqual(b.metadata, { run: "node" });
  const done = await until(b.id, ["completed", "failed", "expired", "cancelled"]);
  assert.equal(done.status, "completed");
  assert.deepEqual({ ...done.request_counts }, { total: 20, completed: 20, failed: 0 });
  const out = (await (await client.files.content(done.output_file_id)).text()).trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(out.length, 20);
  for (const o of out) assert.equal(o.response.body.choices[0].message.content, `echo: hello from ${o.custom_id}`);

  const second = await client.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions", completion_window: "24h" });
  const ids = [];
  for await (const x of client.batches.list({ limit: 1 })) ids.push(x.id);
  assert.ok(ids.includes(b.id) && ids.includes(second.id), `list pages through both: ${ids}`);
  assert.ok(ids.indexOf(second.id) < ids.indexOf(b.id), "newest first");
  await until(second.id, ["completed"]);
});

test("batches: cancel a running batch", async () => {
  const f = await upload(jsonl(30, { mock: { latency_ms: 2000 } }));
  const b = await client.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions", completion_window: "24h" });
  const c = await client.batches.cancel(b.id);
  assert.ok(["cancelling", "cancelled"].includes(c.status), c.status);
  const end = await until(b.id, ["cancelled"]);
  assert.ok(end.request_counts.completed < 30, "cancelled before every line was sent");
  await assert.rejects(client.batches.cancel("batch_nosuch"), (e) => e instanceof NotFoundError);
});

test("bad input gets OpenAI's error envelope; a server with no upstream refuses at create", async () => {
  await assert.rejects(
    client.batches.create({ input_file_id: "file-nosuch", endpoint: "/v1/chat/completions", completion_window: "24h" }),
    (e) => e instanceof NotFoundError && e.error?.param === "input_file_id",
  );
  const bare = await server([]);
  const f = await bare.files.create({ file: await toFile(Buffer.from(jsonl(100)), "in.jsonl"), purpose: "batch" });
  await assert.rejects(bare.batches.create({ input_file_id: f.id, endpoint: "/v1/chat/completions", completion_window: "24h" }), (e) => {
    assert.ok(e instanceof BadRequestError, String(e));
    assert.match(e.message, /no upstream serves model "gpt-4o-mini".*--upstream URL.*README/);
    return true;
  });
});
