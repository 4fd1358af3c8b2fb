"""The `cluster` step of bench.py (issues 27 and 21): what a cluster of nodes on PostgreSQL + S3
does against one node.

- cancel delay: a batch running at 24 calls at once against a 50 ms upstream is cancelled;
  the mock's call count is sampled every 10 ms after the cancel answers. The delay is the
  time from the answer to the last call the upstream sees (and to the last call in flight
  ending). 16,000 lines: 8 units of the default 2,000, so that every node of three has one.
  One embedded node (the baseline), then three nodes with the default `lease_ttl_s` (30 s),
  the batch created through node 3 and cancelled through node 2.

- throughput: one batch on 1, 2 and 3 nodes against an upstream that is the bottleneck (the
  mock serves 24 at once at 100 ms and queues the rest; `max_concurrency = 24` for the
  cluster): lines/s and its ratio to one node's, store commits and PostgreSQL transactions
  per 1,000 results (all nodes together), and the peak in flight at the mock.

Each figure needs PostgreSQL and S3 (see bench.py's scale step); without them it is n/a.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

SIZES = {
    "full": {"cancel_lines": 16000, "cancel_reps": 5, "bound_lines": 6000},
    "quick": {"cancel_lines": 16000, "cancel_reps": 3, "bound_lines": 2000},
}
BOUND_SLOTS = 24
BOUND_LATENCY_MS = 100
CONCURRENCY = 24
LATENCY_MS = 50
WATCH_S = 2.5


def mock_stats(bench) -> dict:
    return json.loads(bench.mock_api.request("GET", "/stats")[1])


def node_requests(bench_mod, api) -> float:
    m = bench_mod.read_metrics(api) or {}
    return bench_mod.counter(m, "batchd_upstream_requests_total") or 0.0


def cancel_once(bench, bench_mod, file_id: str, via_create, via_cancel, all_nodes: list) -> tuple[float, float]:
    """Creates a batch through `via_create`, waits until every node sends, cancels it through
    `via_cancel`; returns (s to the last call seen, s to no call in flight) after the answer."""
    b = bench_mod.create_batch(via_create, file_id)
    base = [node_requests(bench_mod, a) for a in all_nodes]
    deadline = time.perf_counter() + 60
    while any(node_requests(bench_mod, a) <= b0 for a, b0 in zip(all_nodes, base)):
        if time.perf_counter() > deadline:
            raise TimeoutError("not every node took part in the batch within 60 s")
        time.sleep(0.05)
    time.sleep(0.5)
    if mock_stats(bench)["in_flight"] == 0:
        raise RuntimeError("nothing in flight when cancelling")
    via_cancel.json("POST", f"/v1/batches/{b['id']}/cancel")
    t0 = time.perf_counter()
    last = mock_stats(bench)
    last_call, idle_at = 0.0, None
    while time.perf_counter() - t0 < WATCH_S:
        st = mock_stats(bench)
        t = time.perf_counter() - t0
        if st["requests"] != last["requests"]:
            last_call = t
            idle_at = None
        if st["in_flight"] == 0 and idle_at is None:
            idle_at = t
        last = st
        time.sleep(0.01)
    deadline = time.perf_counter() + 60
    while via_create.json("GET", f"/v1/batches/{b['id']}")["status"] != "cancelled":
        if time.perf_counter() > deadline:
            raise TimeoutError("the batch did not end cancelled within 60 s")
        time.sleep(0.1)
    return last_call, idle_at if idle_at is not None else WATCH_S


def xacts(pg: str, database: str) -> int:
    """Transactions committed and rolled back in `database` so far (pg_stat_database)."""
    name = database.rsplit("/", 1)[1].split("?")[0]
    q = f"SELECT pg_stat_force_next_flush(); SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{name}'"
    out = subprocess.run(["psql", pg, "-qtA", "-c", q], check=True, capture_output=True, text=True).stdout.split()
    return int(out[-1])


def idle_rate(pg: str, database: str, nodes: int, seconds: float = 15.0) -> float:
    """PostgreSQL transactions a second per idle node (the psql reads themselves excluded)."""
    a = xacts(pg, database)
    time.sleep(seconds)
    b = xacts(pg, database)
    return max(b - a - 2, 0) / seconds / nodes


def summary(delays: list[tuple[float, float]]) -> str:
    calls = sorted(d[0] for d in delays)
    idle = sorted(d[1] for d in delays)
    return f"last call {calls[len(calls) // 2] * 1000:.0f} ms median, {calls[-1] * 1000:.0f} ms max; " \
           f"nothing in flight {idle[-1] * 1000:.0f} ms max"


def cancel_delays(bench, bench_mod, pg: str, s3: str, s: dict) -> None:
    n, reps = s["cancel_lines"], s["cancel_reps"]
    path = bench.work / "cancel.jsonl"
    bench_mod.write_small(path, n)
    fig, target = f"cancel → last upstream call, 3 nodes ÷ 1 (lease_ttl_s 30, C={CONCURRENCY}, L={LATENCY_MS}ms)", "≤ 1 s"
    try:
        bench.set_latency(LATENCY_MS)
        srv, api = bench.serve("cancel-embedded", CONCURRENCY)
        try:
            fid, _ = bench_mod.upload(api.host + ":" + str(api.port), path)
            one = [cancel_once(bench, bench_mod, fid, api, api, [api]) for _ in range(reps)]
        finally:
            srv.stop()
        database, blob = bench.fresh_backends(pg, s3)
        nodes = [bench.serve_on(f"cancel-node{i + 1}", CONCURRENCY, database, blob, s3) for i in range(3)]
        try:
            apis = [a for _, a in nodes]
            time.sleep(2)  # a heartbeat or two: every node is live
            fid, _ = bench_mod.upload(apis[2].host + ":" + str(apis[2].port), path)
            three = [cancel_once(bench, bench_mod, fid, apis[2], apis[1], apis) for _ in range(reps)]
            time.sleep(2)
            idle = idle_rate(pg, database, len(nodes))
        finally:
            for srv, _ in nodes:
                srv.stop()
    except Exception as e:
        bench.error(fig, target, e)
        return
    finally:
        bench.set_latency(0)
    bench.note(f"cancel, one embedded node ({reps} runs): {summary(one)}")
    bench.note(f"cancel, three nodes on PostgreSQL + S3, created via node 3, cancelled via node 2 ({reps} runs): {summary(three)}")
    bench.note(f"an idle node of three costs {idle:.1f} PostgreSQL transactions/s (heartbeat, the supervisor's look, "
               f"lease renewal; listening for status changes costs none)")
    worst1, worst3 = max(max(d) for d in one), max(max(d) for d in three)
    bench.figures.append({"figure": fig, "measured": f"{worst3 * 1000:.0f} ms (max of {reps})",
                          "baseline": f"{worst1 * 1000:.0f} ms (one node)", "ratio": worst3 / worst1 if worst1 > 0 else None,
                          "target": target, "result": "PASS" if worst3 <= 1.0 else "MISS"})


def counters(bench_mod, apis: list) -> tuple[float, float]:
    """Store commits and results committed, summed over the nodes."""
    c = r = 0.0
    for a in apis:
        m = bench_mod.read_metrics(a) or {}
        c += bench_mod.counter(m, "batchd_store_commits_total") or 0.0
        r += bench_mod.counter(m, "batchd_results_committed_total") or 0.0
    return c, r


def bound_run(bench, bench_mod, pg: str, s3: str, nodes: int, path: Path, n: int) -> dict:
    """One n-line batch on `nodes` fresh nodes against the bound upstream."""
    database, blob = bench.fresh_backends(pg, s3)
    srvs = [bench.serve_on(f"bound{nodes}-node{i + 1}", BOUND_SLOTS, database, blob, s3) for i in range(nodes)]
    try:
        apis = [a for _, a in srvs]
        time.sleep(2.5 if nodes > 1 else 0.5)  # every node joined
        fid, _ = bench_mod.upload(apis[0].host + ":" + str(apis[0].port), path)
        bench.mock_api.request("POST", "/stats/reset")
        c0, x0 = counters(bench_mod, apis), xacts(pg, database)
        t0 = time.perf_counter()
        b = bench_mod.create_batch(apis[-1], fid)
        r = bench_mod.follow(apis[0], b["id"], t0, bench.sizes["timeout_s"])
        elapsed = time.perf_counter() - t0
        if r["batch"]["status"] != "completed":
            raise RuntimeError(f"the batch ended {r['batch']['status']}")
        time.sleep(1.5)  # the last commits reach /metrics and pg_stat
        c1, x1 = counters(bench_mod, apis), xacts(pg, database)
        st = mock_stats(bench)
    finally:
        for srv, _ in srvs:
            srv.stop()
    results = max(c1[1] - c0[1], 1.0)
    return {"rate": n / elapsed, "commits_k": (c1[0] - c0[0]) * 1000 / results, "xacts_k": (x1 - x0) * 1000 / results,
            "peak": st.get("peak_in_flight")}


def throughput(bench, bench_mod, pg: str, s3: str, s: dict) -> None:
    n = s["bound_lines"]
    path = bench.work / "bound.jsonl"
    bench_mod.write_small(path, n)
    runs = {}
    try:
        bench.mock_api.json("POST", "/config", {"latency_ms": BOUND_LATENCY_MS, "slots": BOUND_SLOTS})
        for nodes in (1, 2, 3):
            runs[nodes] = bound_run(bench, bench_mod, pg, s3, nodes, path, n)
    except Exception as e:
        bench.error(f"{len(runs) + 1} nodes ÷ 1, upstream-bound ({n:,} lines)", "ratio ≥ 0.90", e)
        return
    finally:
        bench.mock_api.json("POST", "/config", {"latency_ms": 0, "slots": 0})
    one = runs[1]["rate"]
    for nodes, r in runs.items():
        bench.note(f"{nodes} node(s), {n:,} lines against {BOUND_SLOTS} slots at {BOUND_LATENCY_MS} ms: {r['rate']:,.0f} lines/s "
                   f"(create → completed), peak in flight {r['peak']}; per 1,000 results: {r['commits_k']:.0f} store commits, "
                   f"{r['xacts_k']:.0f} PostgreSQL transactions")
        if nodes > 1:
            ratio = r["rate"] / one
            bench.figures.append({"figure": f"{nodes} nodes ÷ 1, upstream-bound ({n:,} lines, C={BOUND_SLOTS}, L={BOUND_LATENCY_MS}ms)",
                                  "measured": f"{r['rate']:,.0f} lines/s", "baseline": f"{one:,.0f} lines/s (one node)",
                                  "ratio": ratio, "target": "ratio ≥ 0.90", "result": "PASS" if ratio >= 0.9 else "MISS"})


def run(bench, bench_mod) -> None:
    s = SIZES["quick" if bench.args.quick else "full"]
    pg, s3 = os.environ.get("BATCHD_BENCH_POSTGRES_URL"), os.environ.get("BATCHD_BENCH_S3_URL")
    print("\n[cluster] cross-node cancel delay against one node's; 1/2/3 nodes on an upstream-bound run", flush=True)
    if not pg or not s3 or not shutil.which("psql"):
        bench.note("skipped: needs BATCHD_BENCH_POSTGRES_URL, BATCHD_BENCH_S3_URL and psql")
        bench.figures.append({"figure": "cluster figures", "measured": "n/a (no PostgreSQL or S3)", "baseline": "",
                              "ratio": None, "target": "", "result": "n/a"})
        return
    cancel_delays(bench, bench_mod, pg, s3, s)
    throughput(bench, bench_mod, pg, s3, s)
