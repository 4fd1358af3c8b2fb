"""The `remote` step of bench.py (issue 23): a batch over a hosted Batch API upstream
(`kind = "openai-batch"`). A second `batchd serve` plays the provider (the OpenAI Batch +
Files API, the mock upstream behind it); the local batchd gathers N lines into remote
batches of at most `max_lines`.

Figures, each against a baseline measured in the same run:
- calls saved: the provider's upstream sees N lines, but the local batchd creates only
  ⌈N / max_lines⌉ remote batches holding N lines (baseline: the N calls an online upstream
  takes); remote batches created ÷ ⌈N / max_lines⌉ must be exactly 1 (none created twice);
- wall time through the provider ÷ the same lines sent online to the same mock.
"""

from __future__ import annotations

import math

SIZES = {"full": {"lines": 50_000, "max_lines": 1_000}, "quick": {"lines": 10_000, "max_lines": 1_000}}


def run(bench, bench_mod) -> None:
    s = SIZES["quick" if bench.args.quick else "full"]
    n, max_lines = s["lines"], s["max_lines"]
    expect = math.ceil(n / max_lines)
    print(f"\n[remote] {n:,} lines through a batch upstream (a second batchd as the provider), max_lines {max_lines}", flush=True)
    path = bench.work / "remote.jsonl"
    bench_mod.write_small(path, n)
    mock = bench.mock_api
    mock_url = f"http://{bench.mock.addr}/v1"
    fig = "remote: remote batches ÷ ⌈N/max_lines⌉"
    try:
        bench.mock_reset()
        online, api = bench.serve_config("remote-online", f'[[upstreams]]\nname = "m"\nbase_url = "{mock_url}"\nmodels = ["*"]\nmax_concurrency = 64\n')
        try:
            base = bench_mod.run_batch(api, mock, path, n, bench.timeout_for(n), (online.pid, bench.mock.pid))
        finally:
            online.stop()
        provider, papi = bench.serve_config("remote-provider", f'[[upstreams]]\nname = "m"\nbase_url = "{mock_url}"\nmodels = ["*"]\nmax_concurrency = 64\n')
        try:
            toml = (f'[[upstreams]]\nname = "hosted"\nbase_url = "http://{provider.addr}/v1"\nmodels = ["*"]\n'
                    f'kind = "openai-batch"\nmax_lines = {max_lines}\npoll_interval_s = 0.5\n')
            local, lapi = bench.serve_config("remote-local", toml)
            try:
                r = bench_mod.run_batch(lapi, mock, path, n, bench.timeout_for(n) * 2, (local.pid, provider.pid))
            finally:
                local.stop()
            remote = papi.json("GET", "/v1/batches?limit=100")["data"]
            pages = remote
            while len(pages) == 100:
                pages = papi.json("GET", f"/v1/batches?limit=100&after={pages[-1]['id']}")["data"]
                remote += pages
        finally:
            provider.stop()
        created = len(remote)
        seen_lines = sum(b["request_counts"]["total"] for b in remote)
        upstream = r["mock"]["requests"]
        bench.note(f"online: {n:,} lines in {base['run_s']:.1f} s, {base['mock']['requests']:,} upstream calls; "
                   f"through the provider: {r['run_s']:.1f} s, {created} remote batches holding {seen_lines:,} lines, "
                   f"the provider's upstream saw {upstream:,} calls")
        bench.figures.append({"figure": fig, "measured": f"{created} batches, {seen_lines:,} lines", "baseline": f"{n:,} online calls",
                              "ratio": created / expect, "target": f"ratio = 1 ({expect} batches)",
                              "result": "PASS" if created == expect and seen_lines == n else "MISS"})
        bench.figures.append({"figure": "remote: wall time ÷ online", "measured": f"{r['run_s']:.1f} s", "baseline": f"{base['run_s']:.1f} s",
                              "ratio": r["run_s"] / base["run_s"], "target": "report", "result": "PASS"})
    except Exception as e:  # noqa: BLE001 - a figure that cannot be measured is reported, not fatal
        bench.error(fig, f"ratio = 1 ({expect} batches)", e)
    path.unlink(missing_ok=True)

