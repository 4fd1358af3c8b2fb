"""Knowing what a batch is doing without polling (issue #13), through the official SDK and
real clients: webhooks verified by the SDK's own `client.webhooks.unwrap` (a receiver that
works, one that answers 500 at first, one that is down until after a batchd restart), the
event stream read by an SSE library with a reconnect on `Last-Event-ID`, `/progress`,
retry, usage, cost and quotas through the SDK's generic requests, and `/metrics` read by the
Prometheus text-format parser.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2 as http
import openai
import pytest
from openai.types import Batch
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent
from prometheus_client.parser import text_string_to_metric_families
from sseclient import SSEClient

from sdkutil import MODEL, SLOW_MODEL, chat_line, make_config, raw_batch, start_batch, upload, wait_for, write_jsonl

KEYS = {"hooks": "sk-hooks", "flaky": "sk-flaky", "down": "sk-down", "quota": "sk-quota"}


def whsec() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A webhook receiver on 127.0.0.1: records every delivery (headers and raw body) and
    answers 500 to the first `fail_first` of them, 200 after."""

    def __init__(self, port: int = 0, fail_first: int = 0):
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    failing = len(outer.deliveries) <= outer.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.deliveries) >= n:
                    return list(self.deliveries)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.deliveries)} deliveries after {timeout}s, wanted {n}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tenant_block(name: str, url: str | None = None, secret: str | None = None, extra: str = "") -> str:
    out = f'[[tenants]]\nname = "{name}"\napi_keys = ["{KEYS[name]}"]\n'
    if url:
        out += f'webhook_url = "{url}"\nwebhook_secret = "{secret}"\n'
    return out + extra + "\n"


def config(mock_url: str, tenants: str) -> str:
    base = make_config(mock_url).replace("[batches]", "[batches]\nstall_after_s = 30")
    prices = f'\n[prices."{MODEL}"]\ninput_per_million = 0.15\noutput_per_million = 0.60\nbatch_discount = 0.5\n'
    return tenants + base + prices


@pytest.fixture(scope="module")
def mock(launcher):
    """This module's mock upstream announces a generous rate limit in `x-ratelimit-*` headers
    (never reached here), so batchd learns a rate and `/metrics` has every documented family."""
    return launcher.mock("--rpm", "1000000")


@pytest.fixture(scope="module")
def hooks(launcher, mock):
    good, flaky = Receiver(), Receiver(fail_first=2)
    secrets = {"hooks": whsec(), "flaky": whsec()}
    tenants = (tenant_block("hooks", good.url, secrets["hooks"]) + tenant_block("flaky", flaky.url, secrets["flaky"])
               + tenant_block("quota", extra="max_queued_requests = 6\n"))
    server = launcher.server(config(mock.base_url, tenants))
    yield {"server": server, "good": good, "flaky": flaky, "secrets": secrets}
    good.close()
    flaky.close()


def final_event_id(server, key: str, batch_id: str) -> str:
    """The `evt_…` id of the batch's final status event, from its full event history."""
    with server.http(key) as c:
        r = c.get(f"/v1/batches/{batch_id}/events", params={"after": 0}, timeout=30)
        assert r.status_code == 200, r.text
        events = [json.loads(e.data) for e in SSEClient(iter([r.content])).events() if e.data]
    return events[-1]["id"]


def unwrap(server, key: str, secret: str, delivery: tuple[dict[str, str], bytes]):
    headers, body = delivery
    return server.client(key).webhooks.unwrap(body, headers, secret=secret)


def test_webhooks_are_verified_by_the_official_sdk(hooks):
    s, good, secret = hooks["server"], hooks["good"], hooks["secrets"]["hooks"]
    client = s.client(KEYS["hooks"])
    ok = wait_for(client, start_batch(client, [chat_line(f"w-{i}") for i in range(3)]).id, "completed")
    bad = wait_for(client, start_batch(client, b"\n\n").id, "failed")
    deliveries = good.wait(2, 30)
    events = {e.data.id: e for e in (unwrap(s, KEYS["hooks"], secret, d) for d in deliveries)}
    assert events[ok.id].type == "batch.completed" and events[bad.id].type == "batch.failed", events
    assert events[ok.id].object == "event" and events[ok.id].created_at >= ok.created_at
    ids = {d[0]["webhook-id"] for d in deliveries}
    assert final_event_id(s, KEYS["hooks"], ok.id) in ids, "webhook-id is the final event's id"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(s, KEYS["hooks"], whsec(), deliveries[0])


def test_a_receiver_answering_500_gets_the_event_again_with_the_same_id(hooks):
    s, flaky = hooks["server"], hooks["flaky"]
    client = s.client(KEYS["flaky"])
    b = wait_for(client, start_batch(client, [chat_line("f-1")]).id, "completed")
    deliveries = flaky.wait(3, 30)  # two 500s (retried after ~1 s and ~5 s), then a 200
    assert len({d[0]["webhook-id"] for d in deliveries}) == 1, "every redelivery has the same webhook-id"
    event = unwrap(s, KEYS["flaky"], hooks["secrets"]["flaky"], deliveries[-1])
    assert (event.type, event.data.id) == ("batch.completed", b.id)
    time.sleep(1.5)
    assert len(flaky.deliveries) == 3, "no delivery after the receiver took it"


def test_a_receiver_down_gets_the_event_after_a_batchd_restart(launcher, mock):
    port, secret = free_port(), whsec()
    server = launcher.server(config(mock.base_url, tenant_block("down", f"http://127.0.0.1:{port}/hook", secret)))
    client = server.client(KEYS["down"])
    b = wait_for(client, start_batch(client, [chat_line("d-1")]).id, "completed")
    want = final_event_id(server, KEYS["down"], b.id)
    time.sleep(1.5)  # the first attempts fail: nothing listens
    assert server.stop() == 0
    receiver = Receiver(port=port)
    try:
        again = launcher.server(server.config_path, data_dir=server.data_dir)
        deliveries = receiver.wait(1, 60)
        event = unwrap(again, KEYS["down"], secret, deliveries[0])
        assert (event.type, event.data.id, deliveries[0][0]["webhook-id"]) == ("batch.completed", b.id, want)
        metrics = again.http().get("/metrics").text
        assert 'batchd_webhook_deliveries_total{outcome="delivered"} 1' in metrics
    finally:
        receiver.close()


def test_the_server_wide_webhook_serves_a_server_without_tenants(launcher, mock):
    """`[webhooks] url/secret` with no `[[tenants]]`: the `default` tenant's batches are
    delivered, a cancel as `batch.cancelled`, each verified by the SDK's `webhooks.unwrap`."""
    receiver, secret = Receiver(), whsec()
    server = launcher.server(make_config(mock.base_url) + f'\n[webhooks]\nurl = "{receiver.url}"\nsecret = "{secret}"\n')
    try:
        client = server.client()
        done = wait_for(client, start_batch(client, [chat_line("n-1")]).id, "completed")
        slow = start_batch(client, [chat_line(f"n-s{i}", model=SLOW_MODEL, mock={"latency_ms": 1500}) for i in range(6)])
        wait_for(client, slow.id, "in_progress")
        client.batches.cancel(slow.id)
        cancelled = wait_for(client, slow.id, "cancelled")
        deliveries = receiver.wait(2, 30)
        events = {}
        for headers, body in deliveries:
            event = client.webhooks.unwrap(body, headers, secret=secret)
            events[event.data.id] = (event, json.loads(body), headers)
        assert set(events) == {done.id, cancelled.id}, events

        event, raw, headers = events[cancelled.id]
        assert isinstance(event, BatchCancelledWebhookEvent) and event.type == "batch.cancelled", event
        assert raw == {"id": raw["id"], "object": "event", "type": "batch.cancelled",
                       "created_at": raw["created_at"], "data": {"id": cancelled.id}}, raw
        assert raw["id"].startswith("evt_") and headers["webhook-id"] == raw["id"]
        assert raw["id"] == final_event_id(server, None, cancelled.id), "the final status event's id"
        assert cancelled.created_at <= raw["created_at"] <= cancelled.cancelled_at + 1, (raw, cancelled)
        event, raw, _ = events[done.id]
        assert isinstance(event, BatchCompletedWebhookEvent) and raw["type"] == "batch.completed", raw

        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(deliveries[0][1], deliveries[0][0], secret=whsec())
        time.sleep(1.2)
        assert len(receiver.deliveries) == 2, "each event once: the receiver took both"
        assert 'batchd_webhook_deliveries_total{outcome="delivered"} 2' in server.http().get("/metrics").text
    finally:
        receiver.close()


def read_events(server, key: str, path: str, last_event_id: str | None = None, stop_after: int | None = None):
    """Events of a stream read with an SSE library, over the SDK's HTTP client."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    out = []
    with server.http(key) as c, c.stream("GET", path, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for e in SSEClient(r.iter_bytes()).events():
            if not e.data:
                continue
            out.append((e.id, e.event, json.loads(e.data)))
            if stop_after is not None and len(out) >= stop_after:
                break
    return out


def test_an_sse_client_reconnects_with_last_event_id_without_a_gap(hooks):
    s = hooks["server"]
    client = s.client(KEYS["hooks"])
    lines = [chat_line(f"s-{i}", model=SLOW_MODEL, mock={"latency_ms": 250}) for i in range(12)]
    b = start_batch(client, lines)
    first = read_events(s, KEYS["hooks"], f"/v1/batches/{b.id}/events", stop_after=3)
    rest = read_events(s, KEYS["hooks"], f"/v1/batches/{b.id}/events", last_event_id=first[-1][0])
    history = read_events(s, KEYS["hooks"], f"/v1/batches/{b.id}/events?after=0")
    assert [e[0] for e in first + rest] == [e[0] for e in history], "no gap, no repeat across the reconnect"
    kinds = [e[1] for e in history]
    assert kinds[0] == "batch.status" and "batch.progress" in kinds, kinds
    last = history[-1][2]
    assert (last["type"], last["data"]["status"], last["batch_id"]) == ("batch.status", "completed", b.id)
    assert all(e[2]["id"].startswith("evt_") and e[2]["type"] == e[1] for e in history)
    progress = [e[2]["data"] for e in history if e[1] == "batch.progress"]
    done = [p["request_counts"]["completed"] for p in progress]
    assert done == sorted(done) and all(p["request_counts"]["total"] == 12 for p in progress), progress


def test_progress_retry_usage_cost_and_quota_through_the_sdk(hooks, mock):
    s = hooks["server"]
    client = s.client(KEYS["hooks"])
    lines = [chat_line("r-ok"), chat_line("r-400", mock={"status": 400}), chat_line("r-ok2")]
    b = wait_for(client, start_batch(client, lines, metadata={"run": "1"}).id, "completed")
    p = client.get(f"/batches/{b.id}/progress", cast_to=object)
    assert p["object"] == "batch.progress" and p["counts"]["succeeded"] == 2 and p["counts"]["failed"] == 1, p
    assert [u["name"] for u in p["upstreams"]] == ["mock"] and p["stalled"] is None, p

    retry = client.post(f"/batches/{b.id}/retry", cast_to=Batch, body={"status_codes": [400]})
    assert retry.metadata == {"run": "1", "retry_of": b.id}
    retried = wait_for(client, retry.id, "completed")
    assert retried.request_counts.total == 1
    assert [json.loads(l)["custom_id"] for l in client.files.content(retry.input_file_id).text.splitlines()] == ["r-400"]
    with pytest.raises(openai.BadRequestError) as e:
        client.post(f"/batches/{b.id}/retry", cast_to=Batch, body={"include": ["expired"]})
    assert e.value.code == "nothing_to_retry"

    raw = raw_batch(client, b.id)
    u = raw["usage"]
    assert raw["cost"] == pytest.approx((u["input_tokens"] * 0.15 + u["output_tokens"] * 0.60) / 1e6 * 0.5, abs=1e-6)
    usage = client.get("/usage", cast_to=object, options={"params": {"start_time": b.created_at - 3600, "group_by": "model"}})
    results = [r for bucket in usage["data"] for r in bucket["results"]]
    mine = [r for r in results if r["model"] == MODEL]
    assert mine and sum(r["num_model_requests"] for r in mine) >= 3 and mine[0]["cost"] > 0, usage

    q = s.client(KEYS["quota"])
    slow = [chat_line(f"q-{i}", model=SLOW_MODEL, mock={"latency_ms": 400}) for i in range(5)]
    running = start_batch(q, slow)
    wait_for(q, running.id, "in_progress")
    f = upload(q, slow)
    with pytest.raises(openai.RateLimitError) as e:
        q.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.code == "quota_exceeded" and "max_queued_requests = 6" in e.value.message
    assert e.value.response.headers.get("retry-after")
    quota = q.get("/quota", cast_to=object)
    assert quota["limits"]["max_queued_requests"] == 6 and quota["queued"]["batches"] == 1, quota
    wait_for(q, running.id, "completed")


README = Path(__file__).resolve().parents[2] / "docs" / "events.md"  # the README's Metrics table moved there


def documented_families(only_always: bool = False) -> dict[str, str]:
    """Every metric family of docs/events.md's **Metrics** table, name (without `_total`) -> type;
    with `only_always`, not those the table says are absent where the upstream does not report them."""
    text = README.read_text()
    table = text[text.index("**Metrics**"):]
    table = table[:table.index("\n\n", table.index("| family"))]
    out: dict[str, str] = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`batchd_"):
            continue
        if only_always and "absent where" in row:
            continue
        for name in re.findall(r"`(batchd_[a-z0-9_]+)`", cells[0]):
            out[name.removesuffix("_total")] = cells[1]
    return out


def test_readme_metrics_table_is_read():
    families = documented_families()
    # The table's rows as of this test: a reformatted README must not quietly empty the list.
    for name in ("batchd_upstream_requests", "batchd_upstream_learned_rpm", "batchd_upstream_paused",
                 "batchd_upstream_rate_limited_last_minute", "batchd_upstream_overloaded_last_minute",
                 "batchd_store_commit_seconds", "batchd_batches_failed_by_engine"):
        assert name in families, (name, sorted(families))
    assert set(families.values()) <= {"counter", "gauge", "histogram"}, families
    assert len(families) >= 21, sorted(families)


def test_metrics_parse_with_the_prometheus_parser(hooks):
    s = hooks["server"]
    text = s.http().get("/metrics").text
    families = {f.name.removesuffix("_total"): f for f in text_string_to_metric_families(text)}
    documented = documented_families()
    # The server's own figures (metrics_url) are absent here, as the table says: no metrics_url.
    missing = [n for n in documented_families(only_always=True) if n not in families]
    assert not missing, f"families README documents but /metrics lacks: {missing}"
    wrong = {n: (t, families[n].type) for n, t in documented.items() if n in families and families[n].type != t}
    assert not wrong, f"families whose type is not README's (documented, served): {wrong}"
    learned = {smp.labels["upstream"]: smp.value for smp in families["batchd_upstream_learned_rpm"].samples}
    assert learned.get("mock", 0) > 0, f"the rate announced by the mock's headers: {learned}"
    assert families["batchd_upstream_latency_seconds"].type == "histogram"
    assert families["batchd_store_commit_seconds"].type == "histogram"
    outcomes = {smp.labels.get("outcome") for smp in families["batchd_upstream_requests"].samples}
    assert {"2xx", "4xx"} <= outcomes, outcomes
    delivered = [smp for smp in families["batchd_webhook_deliveries"].samples if smp.labels.get("outcome") == "delivered"]
    assert delivered and delivered[0].value >= 1
    assert [smp.value for smp in families["batchd_store_writable"].samples] == [1.0]
