"""Batch API through the official SDK: the classic flow, errors, lists, cancel, expiry."""

from __future__ import annotations

import time
import uuid

import openai
import pytest
from openai.types import Batch, FileObject
from openai.types.batch_request_counts import BatchRequestCounts
from openai.types.batch_usage import BatchUsage, InputTokensDetails, OutputTokensDetails
from openai.types.model import Model

from sdkutil import (
    CHAT,
    EMBED,
    FINAL,
    MODEL,
    SLOW_MODEL,
    assert_each_once,
    assert_envelope,
    chat_line,
    embed_line,
    envelope_of,
    missing_keys,
    raw_batch,
    raw_file,
    results,
    run_batch,
    start_batch,
    upload,
    wait_for,
)


def assert_batch_json_complete(raw: dict) -> None:
    """Every field of the SDK's Batch type is present in the JSON, null or not."""
    missing = missing_keys(raw, Batch)
    assert not missing, f"Batch JSON lacks SDK fields {missing}: {raw}"
    assert raw["object"] == "batch"
    rc = raw["request_counts"]
    assert rc is not None, "request_counts is null"
    assert not missing_keys(rc, BatchRequestCounts), rc
    if raw["usage"] is not None:
        u = raw["usage"]
        assert not missing_keys(u, BatchUsage), u
        assert not missing_keys(u["input_tokens_details"], InputTokensDetails), u
        assert not missing_keys(u["output_tokens_details"], OutputTokensDetails), u


# ----------------------------------------------------------------------------- classic flow


def test_classic_flow(client):
    lines = [chat_line(f"req-{i}", content=f"Question {i}?") for i in range(1, 5)]
    f = upload(client, lines)
    created = client.batches.with_raw_response.create(
        input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    raw_created = created.http_response.json()
    assert_batch_json_complete(raw_created)
    b = created.parse()
    assert b.id.startswith("batch_")
    assert b.object == "batch"
    assert b.status == "validating"
    assert b.input_file_id == f.id and b.endpoint == CHAT and b.completion_window == "24h"
    assert isinstance(b.created_at, int) and abs(b.created_at - time.time()) < 120
    assert b.expires_at is not None and abs(b.expires_at - (b.created_at + 24 * 3600)) <= 1

    done = wait_for(client, b.id, ("completed",), timeout=30)
    assert done.output_file_id is not None
    assert done.error_file_id is None, "no line failed, so there is no error file"
    assert done.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert done.model == MODEL
    assert done.failed_at is None and done.cancelled_at is None and done.expired_at is None

    # Timestamps set and ordered.
    for name in ("in_progress_at", "finalizing_at", "completed_at"):
        assert isinstance(getattr(done, name), int), f"{name} not set: {done}"
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at

    # Usage summed from the upstream's usage.
    assert done.usage is not None, "usage not reported"
    assert done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    raw_done = raw_batch(client, b.id)
    assert_batch_json_complete(raw_done)

    # The output file: one line per request, OpenAI's output format.
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    assert not missing_keys(raw_file(client, done.output_file_id), FileObject)
    output, errors = results(client, done)
    assert errors == []
    assert_each_once(output, errors, [l["custom_id"] for l in lines])
    ids = set()
    for line in output:
        assert line["id"].startswith("batch_req_"), line
        ids.add(line["id"])
        assert line["error"] is None, line
        resp = line["response"]
        assert resp["status_code"] == 200, line
        assert isinstance(resp.get("request_id"), str) and resp["request_id"], line
        assert resp["body"]["choices"], line
    assert len(ids) == len(output), "batch_req_ ids are not unique"
    assert out_file.bytes == len(client.files.content(done.output_file_id).read())


def test_some_lines_fail_upstream(client):
    lines = [
        chat_line("ok-1"),
        chat_line("bad-1", mock={"status": 400}),
        chat_line("ok-2"),
        chat_line("bad-2", mock={"status": 400}),
        chat_line("ok-3"),
    ]
    done = run_batch(client, lines)
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": 5, "completed": 3, "failed": 2}
    assert done.output_file_id is not None and done.error_file_id is not None
    output, errors = results(client, done)
    assert_each_once(output, errors, [l["custom_id"] for l in lines])
    assert sorted(l["custom_id"] for l in output) == ["ok-1", "ok-2", "ok-3"]
    assert sorted(l["custom_id"] for l in errors) == ["bad-1", "bad-2"]
    for line in errors:
        assert line["id"].startswith("batch_req_"), line
        assert line["response"]["status_code"] == 400, line
        assert isinstance(line["response"]["body"], dict), line
        assert line["error"] is None, line
    assert client.files.retrieve(done.error_file_id).purpose == "batch_output"


def test_embeddings_batch(client):
    lines = [embed_line(f"emb-{i}", f"document number {i}") for i in range(3)]
    done = run_batch(client, lines, endpoint=EMBED)
    assert done.status == "completed", done
    assert done.endpoint == EMBED
    assert done.request_counts.completed == 3
    output, errors = results(client, done)
    assert_each_once(output, errors, [l["custom_id"] for l in lines])
    assert all(l["response"]["status_code"] == 200 and l["response"]["body"]["data"] for l in output)
    assert done.usage is not None and done.usage.input_tokens > 0, "embeddings usage comes from prompt_tokens"


def test_bare_body_lines(client):
    lines = [{"model": MODEL, "messages": [{"role": "user", "content": f"bare {i}"}]} for i in range(3)]
    done = run_batch(client, lines)
    assert done.status == "completed", done
    output, errors = results(client, done)
    assert errors == []
    assert sorted(l["custom_id"] for l in output) == ["line-1", "line-2", "line-3"]


def test_alias_resolves(client):
    lines = [chat_line("alias-1", model="gpt-4o"), chat_line("alias-2", model="mini")]
    done = run_batch(client, lines)
    assert done.status == "completed", done
    output, _ = results(client, done)
    assert len(output) == 2
    for line in output:
        assert line["response"]["body"]["model"] == MODEL, "alias not resolved before sending upstream"


def test_models_list_has_models_and_aliases(client):
    page = client.models.list()
    ids = {m.id for m in page}
    assert {MODEL, "text-embedding-3-small", "gpt-4o", "mini", SLOW_MODEL} <= ids, ids
    raw = client.models.with_raw_response.list().http_response.json()
    assert raw["object"] == "list"
    for m in raw["data"]:
        assert m["object"] == "model"
        assert not missing_keys(m, Model), f"Model JSON lacks SDK fields {missing_keys(m, Model)}: {m}"
        assert type(m["created"]) is int and isinstance(m["owned_by"], str)


# ----------------------------------------------------------------------------- create parameters


def test_metadata_round_trip(client):
    meta = {"project": "e2e", "owner": "sdk-suite", "k" * 64: "v" * 512}
    meta.update({f"key{i}": str(i) for i in range(13)})  # 16 keys: the maximum
    assert len(meta) == 16
    b = start_batch(client, [chat_line("m-1")], metadata=meta)
    assert b.metadata == meta
    assert client.batches.retrieve(b.id).metadata == meta
    listed = {x.id: x for x in client.batches.list(limit=100)}
    assert listed[b.id].metadata == meta
    wait_for(client, b.id, FINAL)


def test_no_metadata_is_null_or_empty(client):
    b = start_batch(client, [chat_line("nm-1")])
    assert b.metadata in (None, {})
    assert "metadata" in raw_batch(client, b.id)


@pytest.mark.parametrize("meta", [
    pytest.param({f"k{i}": "v" for i in range(17)}, id="17-keys"),
    pytest.param({"k" * 65: "v"}, id="65-char-key"),
    pytest.param({"k": "v" * 513}, id="513-char-value"),
])
def test_metadata_limits(client, meta):
    f = upload(client, [chat_line("x")])
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata=meta)
    assert ei.value.param == "metadata"
    assert_envelope(envelope_of(ei.value), param="metadata")


@pytest.mark.parametrize("endpoint", ["/v1/images", "/v1/nope", "v1/chat/completions"])
def test_unsupported_endpoint(client, endpoint):
    f = upload(client, [chat_line("x")])
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    assert ei.value.param == "endpoint"
    assert_envelope(envelope_of(ei.value), param="endpoint")


def test_unconfigured_completion_window(client):
    f = upload(client, [chat_line("x")])
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="48h")
    assert ei.value.param == "completion_window"
    assert_envelope(envelope_of(ei.value), param="completion_window")


def test_configured_short_window_accepted(client):
    b = start_batch(client, [chat_line("w-1")], window="1h")
    assert b.completion_window == "1h"
    assert b.expires_at is not None and abs(b.expires_at - (b.created_at + 3600)) <= 1
    wait_for(client, b.id, ("completed",))


def test_unknown_input_file_is_404(client):
    # The contract maps "unknown id" to 404; an unknown input_file_id is asserted as 404.
    with pytest.raises(openai.NotFoundError) as ei:
        client.batches.create(input_file_id="file-doesnotexist000000000000", endpoint=CHAT,
                              completion_window="24h")
    assert_envelope(envelope_of(ei.value))


def test_input_file_must_have_purpose_batch(client):
    f = upload(client, [chat_line("x")], purpose="user_data")
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert ei.value.param == "input_file_id"
    assert_envelope(envelope_of(ei.value), param="input_file_id")


def test_idempotency_key(client):
    f = upload(client, [chat_line("idem-1")])
    key = f"idem-{uuid.uuid4()}"
    a = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                              extra_headers={"Idempotency-Key": key})
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                              extra_headers={"Idempotency-Key": key})
    assert a.id == b.id
    same = [x for x in client.batches.list(limit=100) if x.input_file_id == f.id]
    assert [x.id for x in same] == [a.id], "a retried create started a second batch"
    c = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                              extra_headers={"Idempotency-Key": key + "-other"})
    assert c.id != a.id
    for x in (a, c):
        wait_for(client, x.id, ("completed",))


# ----------------------------------------------------------------------------- lists


def test_list_pagination(client):
    mine = [start_batch(client, [chat_line(f"page-{i}")]).id for i in range(5)]
    full = [b.id for b in client.batches.list(limit=100)]
    assert set(mine) <= set(full)
    assert len(full) == len(set(full))

    page = client.batches.list(limit=2)
    assert len(page.data) == 2
    assert page.has_more is True
    raw = client.batches.with_raw_response.list(limit=2).http_response.json()
    assert raw["object"] == "list" and raw["has_more"] is True
    assert raw["first_id"] == raw["data"][0]["id"]
    assert raw["last_id"] == raw["data"][-1]["id"]
    for item in raw["data"]:
        assert_batch_json_complete(item)

    nxt = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in page.data + nxt.data] == full[:4]

    walked = [b for b in client.batches.list(limit=2)]
    walked_ids = [b.id for b in walked]
    assert walked_ids == full, "auto-pager must yield each batch exactly once, in list order"
    created = [b.created_at for b in walked]
    assert created == sorted(created, reverse=True), f"not newest first: {created}"
    # The five just created are the newest five.
    assert set(walked_ids[:5]) == set(mine)

    # Default page size is 20.
    assert len(client.batches.list().data) == min(20, len(full))

    end = client.batches.list(limit=2, after=full[-1])
    assert end.data == [] and end.has_more is False

    for bid in mine:
        wait_for(client, bid, FINAL)


@pytest.mark.parametrize("limit", [0, 101])
def test_list_rejects_bad_limit(client, limit):
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.list(limit=limit)
    assert_envelope(envelope_of(ei.value), param="limit")


def test_retrieve_and_cancel_unknown_batch(client):
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError) as ei:
            call("batch_doesnotexist000000000000")
        assert_envelope(envelope_of(ei.value))


# ----------------------------------------------------------------------------- cancel & expiry


@pytest.mark.slow
def test_cancel_in_progress(client):
    n = 10  # 2 s per line at concurrency 2 (the mock-slow upstream): ~10 s if not cancelled
    lines = [chat_line(f"c-{i}", model=SLOW_MODEL, mock={"latency_ms": 2000}) for i in range(n)]
    b = start_batch(client, lines)
    wait_for(client, b.id, ("in_progress",), timeout=20, interval=0.05)

    t0 = time.monotonic()
    c = client.batches.cancel(b.id)
    assert c.id == b.id
    assert c.status in ("cancelling", "cancelled"), c
    assert c.cancelling_at is not None

    done = wait_for(client, b.id, ("cancelled",), timeout=8)
    assert time.monotonic() - t0 < 8
    assert done.cancelled_at is not None and done.cancelling_at is not None
    assert done.cancelling_at <= done.cancelled_at
    assert done.completed_at is None
    assert done.request_counts.total == n

    output, errors = results(client, done)
    assert_each_once(output, errors, [l["custom_id"] for l in lines])
    cancelled = [l for l in errors if (l.get("error") or {}).get("code") == "batch_cancelled"]
    assert cancelled, "lines that never ran must be in the error file as batch_cancelled"
    assert len(output) + len(cancelled) >= n - 2, "at most the in-flight lines may end otherwise"
    for l in cancelled:
        assert l["response"] is None, l
        assert l["error"]["message"], l
        assert l["id"].startswith("batch_req_"), l
    assert done.request_counts.completed == len(output)

    # A final batch never changes again; cancelling it again returns it as it is.
    again = client.batches.cancel(b.id)
    assert again.status == "cancelled"
    assert again.model_dump() == client.batches.retrieve(b.id).model_dump()


def test_cancel_completed_batch_is_unchanged(client):
    done = run_batch(client, [chat_line("cc-1")])
    assert done.status == "completed"
    before = raw_batch(client, done.id)
    after = client.batches.cancel(done.id)
    assert after.status == "completed"
    assert after.cancelling_at is None and after.cancelled_at is None
    assert raw_batch(client, done.id) == before


@pytest.mark.slow
def test_expiry(client):
    n = 6  # 1.5 s per line at concurrency 2: ~4.5 s, longer than the 2 s window
    lines = [chat_line(f"e-{i}", model=SLOW_MODEL, mock={"latency_ms": 1500}) for i in range(n)]
    b = start_batch(client, lines, window="2s")
    assert b.expires_at is not None and b.expires_at - b.created_at <= 3

    done = wait_for(client, b.id, ("expired",), timeout=15)
    assert done.expired_at is not None
    assert done.expired_at >= done.expires_at
    assert done.completed_at is None
    output, errors = results(client, done)
    assert_each_once(output, errors, [l["custom_id"] for l in lines])
    expired = [l for l in errors if (l.get("error") or {}).get("code") == "batch_expired"]
    assert expired, "unfinished lines must be in the error file as batch_expired"
    for l in expired:
        assert l["response"] is None, l
    assert done.request_counts.completed == len(output)
