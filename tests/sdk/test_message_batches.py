"""Anthropic's Message Batches API through the official `anthropic` SDK (issue #24): every
method of `client.messages.batches`, strict response validation plus every SDK field present in
the raw JSON, tenants, errors, cancel mid-run, expiry, and kill -9 mid-batch with every
custom_id once in `client.messages.batches.results(id)`.

batchd serves `claude-x` from an `api = "anthropic"` upstream (the mock's /v1/messages) and
`local-x` from an OpenAI-compatible one (the mock's /v1/chat/completions, requests translated).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import anthropic
import pytest
from anthropic.types import Message
from anthropic.types.messages import (
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchCanceledResult,
    MessageBatchErroredResult,
    MessageBatchExpiredResult,
    MessageBatchIndividualResponse,
    MessageBatchRequestCounts,
    MessageBatchSucceededResult,
)

from sdkutil import missing_keys, toml_list, toml_str

ALICE, BOB = "sk-ant-alice", "sk-ant-bob"
CLAUDE, SLOW, LOCAL = "claude-x", "claude-slow", "local-x"


def config(mock_url: str) -> str:
    def upstream(name: str, api: str, models: list[str], concurrency: int) -> list[str]:
        return ["[[upstreams]]", f"name = {toml_str(name)}", f"base_url = {toml_str(mock_url)}", f"api = {toml_str(api)}",
                f"models = {toml_list(models)}", f"max_concurrency = {concurrency}", ""]
    lines = ["[[tenants]]", 'name = "alice"', f"api_keys = {toml_list([ALICE])}", "",
             "[[tenants]]", 'name = "bob"', f"api_keys = {toml_list([BOB])}", ""]
    lines += upstream("claude", "anthropic", [CLAUDE], 16) + upstream("claude-slow", "anthropic", [SLOW], 2)
    lines += upstream("local", "openai", [LOCAL], 16)
    lines += ["[batches]", 'completion_windows = ["24h", "2s"]', ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def config_text(mock) -> str:
    return config(mock.base_url)


@pytest.fixture(scope="module")
def server(launcher, config_text):
    return launcher.server(config_text)


def sdk(server, key: str = ALICE) -> anthropic.Anthropic:
    """The SDK as a user writes it, only `base_url` changed; strict: a response that does not
    match the SDK's types raises."""
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=30.0,
                               _strict_response_validation=True)


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return sdk(server)


def request(custom_id: str, model: str = CLAUDE, content: str = "Say hello.", **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id,
            "params": {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}], **params}}


def assert_complete(raw: dict[str, Any]) -> None:
    """Every field of the SDK's MessageBatch is in the JSON, null or not."""
    assert not missing_keys(raw, MessageBatch), raw
    assert not missing_keys(raw["request_counts"], MessageBatchRequestCounts), raw


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 30.0) -> MessageBatch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.messages.batches.retrieve(batch_id)
        if b.processing_status == "ended":
            return b
        assert time.monotonic() < deadline, f"{batch_id} never ended: {b}"
        time.sleep(0.05)


def results_by_id(client: anthropic.Anthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    out: dict[str, MessageBatchIndividualResponse] = {}
    for r in client.messages.batches.results(batch_id):
        assert isinstance(r, MessageBatchIndividualResponse)
        assert r.custom_id not in out, f"{r.custom_id} twice in the results"
        out[r.custom_id] = r
    return out


def test_every_method_with_strict_types(client):
    reqs = [request("a-1", system="Be brief."), request("a-2", stop_sequences=["Say"]),
            request("t-1", LOCAL, temperature=0.5), request("bad", mock={"status": 400})]
    raw = client.messages.batches.with_raw_response.create(requests=reqs)
    assert raw.headers.get("request-id", "").startswith("req_")
    created = raw.parse()
    assert isinstance(created, MessageBatch)
    assert_complete(raw.http_response.json())
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 4
    assert created.expires_at > created.created_at

    ended = wait_ended(client, created.id)
    assert_complete(client.messages.batches.with_raw_response.retrieve(created.id).http_response.json())
    assert ended.request_counts == MessageBatchRequestCounts(processing=0, succeeded=3, errored=1, canceled=0, expired=0)
    assert ended.ended_at is not None and ended.results_url

    res = results_by_id(client, created.id)
    assert set(res) == {"a-1", "a-2", "t-1", "bad"}
    for cid in ("a-1", "a-2", "t-1"):
        r = res[cid].result
        assert isinstance(r, MessageBatchSucceededResult) and isinstance(r.message, Message), r
        assert r.message.id.startswith("msg_") and r.message.content[0].type == "text"
    assert res["a-2"].result.message.stop_reason == "stop_sequence"
    err = res["bad"].result
    assert isinstance(err, MessageBatchErroredResult) and err.error.error.type == "invalid_request_error", err

    deleted = client.messages.batches.delete(created.id)
    assert isinstance(deleted, DeletedMessageBatch) and deleted.id == created.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(created.id)


def test_list_pages_both_ways(server):
    c = sdk(server, ALICE)
    ids = [c.messages.batches.create(requests=[request(f"p{i}")]).id for i in range(5)]
    newest_first = list(reversed(ids))
    listed = [b.id for b in c.messages.batches.list(limit=2)]  # auto-paging with after_id
    assert [i for i in listed if i in ids] == newest_first
    page = c.messages.batches.list(limit=2)
    assert page.has_more and page.first_id == page.data[0].id and page.last_id == page.data[-1].id
    raw = c.messages.batches.with_raw_response.list(limit=2).http_response.json()
    assert set(raw) >= {"data", "has_more", "first_id", "last_id"}
    for b in raw["data"]:
        assert_complete(b)
    # before_id pages towards newer batches; the SDK follows first_id.
    upward = [b.id for b in c.messages.batches.list(limit=2, before_id=ids[0])]
    # Each page is the one just above the last (newest first within a page).
    assert upward == [ids[2], ids[1], ids[4], ids[3]], (ids, upward)


def test_errors_come_in_anthropics_envelope(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.batches.create(requests=[request("ok"), request("not ok!"), request("ok"),
                                                 {"custom_id": "x", "params": {"model": CLAUDE, "messages": []}},
                                                 request("y", "no-such-model"), request("z", stream=True)])
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    message = body["error"]["message"]
    for part in ("requests.1.custom_id", "requests.2.custom_id", "requests.3.params.max_tokens",
                 "requests.4.params.model", "requests.5.params.stream"):
        assert part in message, message
    assert e.value.request_id
    with pytest.raises(anthropic.AuthenticationError):
        sdk(server, "sk-wrong").messages.batches.list()
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_nope")


def test_tenants_by_bearer_or_x_api_key(server, client):
    b = client.messages.batches.create(requests=[request("t")])
    bob = sdk(server, BOB)
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.retrieve(b.id)
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.cancel(b.id)
    assert b.id not in [x.id for x in bob.messages.batches.list()]
    # x-api-key (what Anthropic's API and its curl examples use) is the same tenant.
    with server.http() as h:
        r = h.get(f"/v1/messages/batches/{b.id}", headers={"x-api-key": ALICE, "anthropic-version": "2023-06-01"})
        assert r.status_code == 200 and r.json()["id"] == b.id
        assert h.get(f"/v1/messages/batches/{b.id}", headers={"x-api-key": BOB}).status_code == 404


@pytest.mark.slow
def test_cancel_mid_run(client):
    reqs = [request(f"c{i}", SLOW, mock={"latency_ms": 300}) for i in range(16)]
    b = client.messages.batches.create(requests=reqs)
    deadline = time.monotonic() + 20
    while client.messages.batches.retrieve(b.id).request_counts.succeeded < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    canceling = client.messages.batches.cancel(b.id)
    assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at is not None
    ended = wait_ended(client, b.id)
    rc = ended.request_counts
    assert rc.succeeded >= 2 and rc.canceled > 0 and rc.succeeded + rc.canceled == 16 and rc.errored == 0, rc
    res = results_by_id(client, b.id)
    assert len(res) == 16
    assert sum(isinstance(r.result, MessageBatchCanceledResult) for r in res.values()) == rc.canceled


@pytest.mark.slow
def test_expiry_keeps_finished_work(client):
    reqs = [request(f"e{i}", SLOW, mock={"latency_ms": 400}) for i in range(20)]
    # batchd's extension: one of the server's completion windows (Anthropic's is 24 h).
    b = client.messages.batches.create(requests=reqs, extra_body={"completion_window": "2s"})
    ended = wait_ended(client, b.id)
    rc = ended.request_counts
    assert rc.succeeded > 0 and rc.expired > 0 and rc.succeeded + rc.expired == 20, rc
    res = results_by_id(client, b.id)
    assert sum(isinstance(r.result, MessageBatchExpiredResult) for r in res.values()) == rc.expired
    assert sum(isinstance(r.result, MessageBatchSucceededResult) for r in res.values()) == rc.succeeded


@pytest.mark.slow
def test_kill9_mid_batch_every_custom_id_once(launcher, mock, config_text, tmp_path):
    data_dir = tmp_path / "data"
    srv = launcher.server(config_text, data_dir=data_dir)
    c = sdk(srv)
    n = 12
    b = c.messages.batches.create(requests=[request(f"k{i}", SLOW, mock={"latency_ms": 400}) for i in range(n)])
    deadline = time.monotonic() + 20
    while c.messages.batches.retrieve(b.id).request_counts.succeeded < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.messages.batches.retrieve(b.id).processing_status == "in_progress"
    srv.stop(signal.SIGKILL)
    srv2 = launcher.server(config_text, data_dir=data_dir)
    c2 = sdk(srv2)
    ended = wait_ended(c2, b.id)
    assert ended.request_counts.succeeded == n, ended.request_counts
    res = results_by_id(c2, b.id)
    assert sorted(res) == sorted(f"k{i}" for i in range(n))
    assert all(isinstance(r.result, MessageBatchSucceededResult) for r in res.values())
