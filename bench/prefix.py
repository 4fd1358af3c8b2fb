"""The `prefix` step of bench.py (issue 26): what the order of lines does to an inference
server with a prefix cache, on the mock's engine simulator (`mock-upstream --engine-sim`,
run faster than real time with `--sim-speedup`; its figures are simulated GPU time, not a
claim about any GPU — no GPU machine is available to the project).

- prefix-heavy: P shared ~2,000-token documents × Q questions, shuffled; batchd with
  `prefix_order = true` against `false` (file order), same window. Ideal: the same lines
  written sorted by document, file order, the window at the server's sequence cap.
- the window that follows the server: the prefix-order run above has `metrics_url` set
  (window up to the server's sequence cap, held by its KV cache, queue and preemptions);
  the same batch with a fixed window of each of `FIXED` (no `metrics_url`): the followed
  window must match the best of them with 0 preemptions.
- no sharing: lines with nothing in common, `prefix_order = true` against `false`: the
  check that a batch that shares nothing pays nothing.

Every run gets a fresh simulator (an empty cache) and a fresh `batchd serve`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {
    # prefixes, questions each, window (batchd concurrency), simulator KV blocks, speedup
    "full": {"prefixes": 100, "questions": 100, "window": 64, "kv_blocks": 6000, "speedup": 10, "plain_lines": 4000},
    "quick": {"prefixes": 40, "questions": 25, "window": 64, "kv_blocks": 3000, "speedup": 20, "plain_lines": 1000},
}
MAX_SEQS = 256
FIXED = (8, 16, 32, 64, 128)
DOC_BYTES = 8000  # about 2,000 tokens at the simulator's 4 bytes a token


def doc(d: int) -> str:
    words = f"Document {d:03d} section text "
    return (words * (DOC_BYTES // len(words) + 1))[:DOC_BYTES]


def line(cid: str, system: str, user: str) -> str:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}, separators=(",", ":"))


def write_prefix_heavy(path: Path, p: int, q: int, shuffled: bool) -> int:
    pairs = [(d, k) for d in range(p) for k in range(q)]
    if shuffled:
        random.Random(26).shuffle(pairs)
    docs = [doc(d) for d in range(p)]
    with open(path, "w") as f:
        for d, k in pairs:
            f.write(line(f"d{d}-q{k}", docs[d], f"Question {k}: what does document {d} say about item {k}?") + "\n")
    return len(pairs)


def write_plain(path: Path, n: int) -> int:
    with open(path, "w") as f:
        for i in range(n):
            own = (f"Unique text {i:06d} " * 100)[:2000]
            f.write(line(f"p{i}", own, f"Summarise text {i}.") + "\n")
    return n


def sweep_text(r: dict) -> str:
    return (f"{r['throughput']:,.0f} lines/s ({r['run_s']:.1f} s), {r['preemptions']:.0f} preemptions, "
            f"prefix-cache hit rate {r['hit_rate']:.2f}")


def run(bench, bench_mod) -> None:
    s = SIZES["quick" if bench.args.quick else "full"]
    Server, Client = bench_mod.Server, bench_mod.Client
    p, q, window = s["prefixes"], s["questions"], s["window"]
    print(f"\n[prefix] prefix-aware order on the engine simulator: {p} documents of ~2,000 tokens × {q} questions, shuffled; "
          f"window {window} (prefix order: up to {MAX_SEQS}, following the server's metrics); simulator KV cache {s['kv_blocks']} blocks of 16 tokens, {s['speedup']}× faster than real time", flush=True)

    def one(name: str, path: Path, n: int, prefix_order: bool, conc: int, follow: bool = False) -> dict:
        mock = Server(f"sim-{name}", [bench.bin, "mock-upstream", "--listen", "127.0.0.1:0", "--engine-sim",
                                      "--sim-kv-blocks", str(s["kv_blocks"]), "--sim-max-seqs", str(MAX_SEQS),
                                      "--sim-speedup", str(s["speedup"])], cwd=bench.work, log_dir=bench.logs)
        try:
            toml = (f'[[upstreams]]\nname = "sim"\nbase_url = "http://{mock.addr}/v1"\nmodels = ["*"]\n'
                    f"max_concurrency = {conc}\nprefix_order = {'true' if prefix_order else 'false'}\n")
            if follow:
                toml += f'metrics_url = "http://{mock.addr}/metrics"\n'
            srv, api = bench.serve_config(f"prefix-{name}", toml)
            try:
                r = bench_mod.run_batch(api, Client(mock.addr), path, n, bench.timeout_for(n) * 4, (srv.pid, mock.pid))
            finally:
                srv.stop()
            sim = bench_mod.read_metrics(Client(mock.addr)) or {}
        finally:
            mock.stop()
        hits, queries = sim.get("vllm:prefix_cache_hits_total", 0.0), sim.get("vllm:prefix_cache_queries_total", 0.0)
        r["hit_rate"] = hits / queries if queries else 0.0
        r["preemptions"] = sim.get("vllm:num_preemptions_total", 0.0)
        bench.note(f"{name}: {n:,} lines in {r['run_s']:.1f} s (in_progress→completed, {r['validate_s']:.2f} s validating); "
                   f"server prefix-cache hit rate {r['hit_rate']:.2f}, preemptions {r['preemptions']:.0f}")
        return r

    fig = "prefix-heavy: file order ÷ prefix order (time)"
    try:
        shuffled, sorted_ = bench.work / "prefix-shuffled.jsonl", bench.work / "prefix-sorted.jsonl"
        n = write_prefix_heavy(shuffled, p, q, True)
        write_prefix_heavy(sorted_, p, q, False)
        ordered = one("prefix-order-followed", shuffled, n, True, MAX_SEQS, follow=True)
        file_order = one("file-order", shuffled, n, False, window)
        ideal = one("ideal", sorted_, n, False, MAX_SEQS)
        ratio = file_order["run_s"] / ordered["run_s"]
        bench.figures.append({"figure": fig, "measured": f"{ordered['run_s']:.1f} s", "baseline": f"{file_order['run_s']:.1f} s",
                              "ratio": ratio, "target": "ratio ≥ 1.6", "result": "PASS" if ratio >= 1.6 else "MISS"})
        vs_ideal = ordered["run_s"] / ideal["run_s"]
        bench.figures.append({"figure": "prefix-heavy: prefix order ÷ ideal (time)", "measured": f"{ordered['run_s']:.1f} s",
                              "baseline": f"{ideal['run_s']:.1f} s", "ratio": vs_ideal, "target": "ratio ≤ 1.15",
                              "result": "PASS" if vs_ideal <= 1.15 else "MISS"})
        fixed = {w: one(f"prefix-order-fixed-{w}", shuffled, n, True, w) for w in FIXED}
        best = min(fixed, key=lambda w: fixed[w]["run_s"])
        vs_best = fixed[best]["run_s"] / ordered["run_s"]
        for w in FIXED:
            bench.note(f"sweep, fixed window {w}: {sweep_text(fixed[w])}")
        bench.note(f"sweep, metrics-driven window (up to {MAX_SEQS}): {sweep_text(ordered)}")
        ok = vs_best >= 1.0 and ordered["preemptions"] == 0
        bench.figures.append({"figure": f"metrics-driven window ÷ best fixed window ({best}) (throughput)",
                              "measured": f"{ordered['run_s']:.1f} s, {ordered['preemptions']:.0f} preemptions",
                              "baseline": f"{fixed[best]['run_s']:.1f} s", "ratio": vs_best, "target": "ratio ≥ 1.0, 0 preemptions",
                              "result": "PASS" if ok else "MISS"})
        for f in (shuffled, sorted_):
            f.unlink()
    except Exception as e:  # noqa: BLE001 - a figure that cannot be measured is reported, not fatal
        bench.error(fig, "ratio ≥ 1.6", e)
    fig = "no sharing: prefix order on ÷ off (throughput)"
    try:
        plain = bench.work / "prefix-plain.jsonl"
        n = write_plain(plain, s["plain_lines"])
        on = one("plain-prefix-order", plain, n, True, window)
        off = one("plain-file-order", plain, n, False, window)
        ratio = off["run_s"] / on["run_s"]
        bench.figures.append({"figure": fig, "measured": f"{on['throughput']:,.0f} req/s", "baseline": f"{off['throughput']:,.0f} req/s",
                              "ratio": ratio, "target": "ratio ≥ 0.98", "result": "PASS" if ratio >= 0.98 else "MISS"})
        plain.unlink()
    except Exception as e:  # noqa: BLE001
        bench.error(fig, "ratio ≥ 0.98", e)
