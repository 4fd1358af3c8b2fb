"""The `remote` step of bench.py (issue 23): a batch over a hosted Batch API upstream, of each
kind: `openai-batch` (the OpenAI Batch + Files API) and `anthropic-batch` (Anthropic's Message
Batches API, the chat lines sent as Messages). A second `batchd serve` plays the provider
(both APIs, the mock upstream behind it); the local batchd gathers N lines into remote batches
of at most `max_lines`.

Figures, each against a baseline measured in the same run:
- calls saved, per kind: the provider's upstream sees N lines, but the local batchd creates
  only ⌈N / max_lines⌉ remote batches holding N lines (baseline: the N calls an online
  upstream takes); remote batches created ÷ ⌈N / max_lines⌉ must be exactly 1 (none created
  twice);
- wall time through the provider, per kind ÷ the same lines sent online to the same mock.
"""

from __future__ import annotations

import math

SIZES = {"full": {"lines": 50_000, "max_lines": 1_000}, "quick": {"lines": 10_000, "max_lines": 1_000}}

# Per kind: the local upstream's settings, the provider's list path, its cursor parameter,
# and how many lines a listed remote batch holds.
KINDS = {
    "openai-batch": ('kind = "openai-batch"\n', "/v1/batches", "after", lambda b: b["request_counts"]["total"]),
    "anthropic-batch": ('kind = "anthropic-batch"\ndefault_max_tokens = 64\n', "/v1/messages/batches", "after_id", lambda b: sum(b["request_counts"].values())),
}


def listed(papi, path: str, cursor: str) -> list:
    """Every batch the provider lists at `path`, page by page."""
    out, page = [], papi.json("GET", f"{path}?limit=100")
    while True:
        out += page["data"]
        if not page.get("has_more") or not page["data"]:
            return out
        page = papi.json("GET", f"{path}?limit=100&{cursor}={page['data'][-1]['id']}")


def through(bench, bench_mod, kind: str, path, n: int, max_lines: int, mock_url: str):
    """One batch of `n` lines through a provider batchd as a `kind` upstream: the run and the
    remote batches the provider holds."""
    settings, list_path, cursor, lines_of = KINDS[kind]
    provider, papi = bench.serve_config(f"remote-provider-{kind}", f'[[upstreams]]\nname = "m"\nbase_url = "{mock_url}"\nmodels = ["*"]\nmax_concurrency = 64\n')
    try:
        toml = (f'[[upstreams]]\nname = "hosted"\nbase_url = "http://{provider.addr}/v1"\nmodels = ["*"]\n'
                f'{settings}max_lines = {max_lines}\npoll_interval_s = 0.5\n')
        local, lapi = bench.serve_config(f"remote-local-{kind}", toml)
        try:
            bench.mock_reset()
            r = bench_mod.run_batch(lapi, bench.mock_api, path, n, bench.timeout_for(n) * 2, (local.pid, provider.pid))
        finally:
            local.stop()
        remote = listed(papi, list_path, cursor)
    finally:
        provider.stop()
    return r, len(remote), sum(lines_of(b) for b in remote)


def run(bench, bench_mod) -> None:
    s = SIZES["quick" if bench.args.quick else "full"]
    n, max_lines = s["lines"], s["max_lines"]
    expect = math.ceil(n / max_lines)
    print(f"\n[remote] {n:,} lines through a batch upstream of each kind (a second batchd as the provider), max_lines {max_lines}", flush=True)
    path = bench.work / "remote.jsonl"
    bench_mod.write_small(path, n)
    mock = bench.mock_api
    mock_url = f"http://{bench.mock.addr}/v1"
    try:
        bench.mock_reset()
        online, api = bench.serve_config("remote-online", f'[[upstreams]]\nname = "m"\nbase_url = "{mock_url}"\nmodels = ["*"]\nmax_concurrency = 64\n')
        try:
            base = bench_mod.run_batch(api, mock, path, n, bench.timeout_for(n), (online.pid, bench.mock.pid))
        finally:
            online.stop()
    except Exception as e:  # noqa: BLE001 - a figure that cannot be measured is reported, not fatal
        bench.error("remote: online baseline", "report", e)
        path.unlink(missing_ok=True)
        return
    for kind in KINDS:
        fig = f"remote ({kind}): remote batches ÷ ⌈N/max_lines⌉"
        try:
            r, created, seen_lines = through(bench, bench_mod, kind, path, n, max_lines, mock_url)
            upstream = r["mock"]["requests"]
            bench.note(f"{kind}: online {n:,} lines in {base['run_s']:.1f} s, {base['mock']['requests']:,} upstream calls; "
                       f"through the provider: {r['run_s']:.1f} s, {created} remote batches holding {seen_lines:,} lines, "
                       f"the provider's upstream saw {upstream:,} calls")
            bench.figures.append({"figure": fig, "measured": f"{created} batches, {seen_lines:,} lines", "baseline": f"{n:,} online calls",
                                  "ratio": created / expect, "target": f"ratio = 1 ({expect} batches)",
                                  "result": "PASS" if created == expect and seen_lines == n else "MISS"})
            bench.figures.append({"figure": f"remote ({kind}): wall time ÷ online", "measured": f"{r['run_s']:.1f} s", "baseline": f"{base['run_s']:.1f} s",
                                  "ratio": r["run_s"] / base["run_s"], "target": "report", "result": "PASS"})
        except Exception as e:  # noqa: BLE001 - a figure that cannot be measured is reported, not fatal
            bench.error(fig, f"ratio = 1 ({expect} batches)", e)
    path.unlink(missing_ok=True)
