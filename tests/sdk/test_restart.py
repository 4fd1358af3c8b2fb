"""Restart on the same data dir: everything acknowledged is still there, unchanged, and an
in-progress batch resumes and completes with every line exactly once."""

from __future__ import annotations

import signal

import pytest

from sdkutil import (
    CHAT,
    SLOW_MODEL,
    assert_each_once,
    chat_line,
    make_config,
    raw_batch,
    raw_file,
    results,
    run_batch,
    start_batch,
    upload,
    wait_for,
)

pytestmark = pytest.mark.slow

SLOW_CONCURRENCY = 2


@pytest.fixture(scope="module")
def config_text(mock):
    return make_config(mock.base_url, slow_concurrency=SLOW_CONCURRENCY)


def duplicates(stats: dict) -> int:
    d = stats.get("duplicate_request_ids", 0)
    return d if isinstance(d, int) else len(d)


def slow_lines(prefix: str, n: int, latency_ms: int):
    return [chat_line(f"{prefix}-{i}", model=SLOW_MODEL, mock={"latency_ms": latency_ms}) for i in range(n)]


def snapshot(client) -> dict:
    files = client.files.with_raw_response.list().http_response.json()["data"]
    batches = client.batches.with_raw_response.list(limit=100).http_response.json()["data"]
    return {"files": {f["id"]: f for f in files}, "batches": {b["id"]: b for b in batches}}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_keeps_everything_and_resumes(launcher, mock, config_text, tmp_path, sig):
    data_dir = tmp_path / "data"
    srv = launcher.server(config_text, data_dir=data_dir)
    c = srv.client()

    kept = upload(c, b"keep me \x00\xff", purpose="user_data", filename="keep.bin")
    done = run_batch(c, [chat_line("d-1"), chat_line("d-2", mock={"status": 400})], metadata={"k": "v"})
    assert done.status == "completed"
    done_out, done_err = (c.files.content(done.output_file_id).read(), c.files.content(done.error_file_id).read())

    n = 10  # 0.6 s per line at concurrency 2: ~3 s in all
    lines = slow_lines("r", n, 600)
    mock.reset()
    running = start_batch(c, lines)
    running = wait_for(c, running.id, ("in_progress",), timeout=20, interval=0.05,
                       until=lambda b: b.request_counts is not None and b.request_counts.completed >= 2)
    assert running.request_counts.completed < n, "the batch finished before the restart; lines too fast"

    before = snapshot(c)
    before_running = raw_batch(c, running.id)
    code = srv.stop(sig, timeout=30)
    if sig == signal.SIGTERM:
        assert code == 0, f"SIGTERM should shut down gracefully, exit code {code}\n{srv.proc.log_tail()}"

    srv2 = launcher.server(config_text, data_dir=data_dir)
    c2 = srv2.client()
    after = snapshot(c2)

    # Every file and batch is still listed, in the same order, with the same fields. (The only
    # new files allowed are the resumed batch's output/error files, checked below.)
    assert [i for i in after["files"] if i in before["files"]] == list(before["files"])
    assert set(after["batches"]) == set(before["batches"])
    for fid, f in before["files"].items():
        assert after["files"][fid] == f, f"file {fid} changed across restart"
        assert raw_file(c2, fid) == f
    assert after["batches"][done.id] == before["batches"][done.id]
    assert c2.files.content(kept.id).read() == b"keep me \x00\xff"
    assert c2.files.content(done.output_file_id).read() == done_out
    assert c2.files.content(done.error_file_id).read() == done_err

    # The in-progress batch kept its identity and its one-time timestamps.
    now = raw_batch(c2, running.id)
    for k in ("id", "input_file_id", "endpoint", "completion_window", "created_at", "expires_at",
              "in_progress_at", "metadata", "model"):
        assert now[k] == before_running[k], f"{k} changed across restart: {before_running[k]!r} -> {now[k]!r}"
    assert now["status"] in ("in_progress", "finalizing", "completed"), now
    assert now["request_counts"]["completed"] >= before_running["request_counts"]["completed"], \
        "acknowledged results were lost"

    final = wait_for(c2, running.id, ("completed",), timeout=30)
    assert final.in_progress_at == before_running["in_progress_at"]
    assert final.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    output, errors = results(c2, final)
    assert errors == []
    assert set(after["files"]) - set(before["files"]) <= {final.output_file_id, final.error_file_id}
    assert_each_once(output, errors, [l["custom_id"] for l in lines])

    # Only the calls in flight at the stop may be repeated upstream.
    stats = mock.stats()
    assert duplicates(stats) <= SLOW_CONCURRENCY, stats
    assert stats["requests"] <= n + SLOW_CONCURRENCY, stats

    # The restarted server takes new work as usual.
    again = run_batch(c2, [chat_line("after-restart")])
    assert again.status == "completed"
    assert srv2.stop() == 0
