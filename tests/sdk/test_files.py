"""Files API through the official SDK: upload, list, retrieve, content, delete, limits."""

from __future__ import annotations

import time

import openai
import pytest
from openai.types import FileDeleted, FileObject

from sdkutil import (
    CHAT,
    assert_envelope,
    chat_line,
    envelope_of,
    missing_keys,
    raw_file,
    upload,
    wait_for,
    write_jsonl,
)

SAMPLE = write_jsonl([chat_line(f"req-{i}", content=f"line {i}") for i in range(1, 4)])


def test_create_batch_file_and_retrieve_all_fields(client):
    f = upload(client, SAMPLE, filename="sample.jsonl")
    assert isinstance(f, FileObject)
    assert f.id.startswith("file-")
    assert f.object == "file"
    assert f.bytes == len(SAMPLE)
    assert f.filename == "sample.jsonl"
    assert f.purpose == "batch"
    assert isinstance(f.created_at, int) and abs(f.created_at - time.time()) < 120

    got = client.files.retrieve(f.id)
    assert got.model_dump() == f.model_dump()

    raw = raw_file(client, f.id)
    assert not missing_keys(raw, FileObject), f"File JSON lacks SDK fields {missing_keys(raw, FileObject)}: {raw}"
    assert raw["id"] == f.id and raw["object"] == "file"
    assert raw["bytes"] == len(SAMPLE)
    assert type(raw["created_at"]) is int
    assert raw["status"] == "processed"
    assert raw["status_details"] is None
    assert raw["expires_at"] is None or type(raw["expires_at"]) is int


def test_create_user_data_file(client):
    data = b"not jsonl at all \x00\x01\xff binary is fine for user_data"
    f = upload(client, data, purpose="user_data", filename="blob.bin")
    assert f.purpose == "user_data"
    assert f.bytes == len(data)
    assert client.files.content(f.id).read() == data


def test_invalid_purpose_is_400_with_param(client):
    with pytest.raises(openai.BadRequestError) as ei:
        upload(client, SAMPLE, purpose="not-a-purpose")
    assert ei.value.param == "purpose"
    assert_envelope(envelope_of(ei.value), param="purpose")


def test_content_is_byte_identical(client):
    # Bytes that a text-mode round trip would damage: CRLF, no final newline, UTF-8.
    data = write_jsonl([chat_line("a", content="héllo ✓")]) + b'{"custom_id":"b"}\r\n{"x": 1}'
    f = upload(client, data, purpose="user_data", filename="odd.jsonl")
    assert client.files.content(f.id).read() == data


def test_content_range_request(client):
    data = bytes(range(256)) * 4
    f = upload(client, data, purpose="user_data", filename="range.bin")

    r = client.files.with_raw_response.content(f.id, extra_headers={"Range": "bytes=10-29"})
    assert r.status_code == 206, r.http_response.text[:200]
    assert r.http_response.content == data[10:30]
    assert r.headers.get("content-range") == f"bytes 10-29/{len(data)}"

    r = client.files.with_raw_response.content(f.id, extra_headers={"Range": "bytes=1000-"})
    assert r.status_code == 206
    assert r.http_response.content == data[1000:]

    r = client.files.with_raw_response.content(f.id, extra_headers={"Range": "bytes=-24"})
    assert r.status_code == 206
    assert r.http_response.content == data[-24:]

    # No Range: the whole file, 200.
    r = client.files.with_raw_response.content(f.id)
    assert r.status_code == 200
    assert r.http_response.content == data


def test_unsatisfiable_range_is_416_or_ignored(server, client):
    # RFC 9110: 416 for a range past the end (a server may also ignore Range and send 200).
    data = b"0123456789"
    f = upload(client, data, purpose="user_data")
    with server.http("sk-unused") as h:
        r = h.get(f"/v1/files/{f.id}/content", headers={"Range": "bytes=50-60"})
    assert r.status_code in (416, 200), (r.status_code, r.text[:200])
    if r.status_code == 200:
        assert r.content == data


def test_expires_after_sets_expires_at(client):
    f = upload(client, SAMPLE, expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    assert client.files.retrieve(f.id).expires_at == f.created_at + 3600


def test_delete_then_not_found(client):
    f = upload(client, SAMPLE)
    d = client.files.delete(f.id)
    assert isinstance(d, FileDeleted)
    assert d.id == f.id and d.deleted is True and d.object == "file"
    with pytest.raises(openai.NotFoundError) as ei:
        client.files.retrieve(f.id)
    assert_envelope(envelope_of(ei.value))
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)
    assert f.id not in {x.id for x in client.files.list()}


def test_retrieve_unknown_file_is_404(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.files.retrieve("file-doesnotexist000000000000")
    assert_envelope(envelope_of(ei.value))


def test_list_filters_by_purpose(client):
    mine_batch = upload(client, SAMPLE).id
    mine_user = upload(client, b"x", purpose="user_data").id
    batch_ids = {f.id for f in client.files.list(purpose="batch")}
    user_ids = {f.id for f in client.files.list(purpose="user_data")}
    assert mine_batch in batch_ids and mine_batch not in user_ids
    assert mine_user in user_ids and mine_user not in batch_ids
    assert all(f.purpose == "user_data" for f in client.files.list(purpose="user_data"))


def test_list_pagination_order_and_after(client):
    ids = [upload(client, b"p%d" % i, purpose="user_data", filename=f"page-{i}.txt").id for i in range(7)]
    mine = set(ids)

    # Auto-pagination, limit 2: every file exactly once, newest first (default order desc).
    seen = [f for f in client.files.list(limit=2, purpose="user_data")]
    seen_ids = [f.id for f in seen]
    assert len(seen_ids) == len(set(seen_ids)), f"auto-pager repeated ids: {seen_ids}"
    assert mine <= set(seen_ids)
    created = [f.created_at for f in seen]
    assert created == sorted(created, reverse=True), f"not newest first: {created}"

    # Explicit desc equals the default, asc is its exact reverse.
    desc = [f.id for f in client.files.list(limit=2, purpose="user_data", order="desc")]
    asc = [f.id for f in client.files.list(limit=2, purpose="user_data", order="asc")]
    assert desc == seen_ids
    assert asc == list(reversed(desc))
    # Files created in the same second tie on created_at; the contract breaks ties by id, so
    # upload order within one second is not asserted.

    # Manual pages: first page of 2 with has_more, then `after` continues where it stopped.
    p1 = client.files.list(limit=2, purpose="user_data")
    assert len(p1.data) == 2 and p1.has_more is True
    p2 = client.files.list(limit=2, purpose="user_data", after=p1.data[-1].id)
    assert [f.id for f in p1.data + p2.data] == seen_ids[:4]

    # The list envelope carries first_id / last_id as the contract says.
    raw = client.files.with_raw_response.list(limit=2, purpose="user_data").http_response.json()
    assert raw["object"] == "list"
    assert raw["has_more"] is True
    assert raw.get("first_id") == raw["data"][0]["id"]
    assert raw.get("last_id") == raw["data"][-1]["id"]

    # Past the end: an empty page with has_more false.
    last = client.files.list(limit=2, purpose="user_data", after=seen_ids[-1])
    assert last.data == [] and last.has_more is False


def test_list_rejects_bad_limit(client):
    for bad in (0, 10_001):
        with pytest.raises(openai.BadRequestError) as ei:
            client.files.list(limit=bad)
        assert_envelope(envelope_of(ei.value), param="limit")


def test_upload_over_limit_is_413(client):
    # max_upload_bytes is 200000 in the standard config.
    big = b'{"pad": "' + b"x" * 210_000 + b'"}\n'
    with pytest.raises(openai.APIStatusError) as ei:
        upload(client, big)
    assert ei.value.status_code == 413
    assert_envelope(envelope_of(ei.value))
    # Nothing half-stored is listed.
    assert all(f.bytes < 200_000 for f in client.files.list())


@pytest.mark.slow
def test_cannot_delete_input_of_running_batch(client):
    lines = [chat_line(f"slow-{i}", mock={"latency_ms": 3000}) for i in range(3)]
    f = upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    wait_for(client, b.id, ("in_progress",), timeout=20, interval=0.05)

    with pytest.raises(openai.ConflictError) as ei:
        client.files.delete(f.id)
    assert ei.value.status_code == 409
    assert_envelope(envelope_of(ei.value))
    assert client.files.retrieve(f.id).id == f.id  # still there

    done = wait_for(client, b.id, ("completed",), timeout=30)
    assert done.request_counts.completed == 3
    d = client.files.delete(f.id)
    assert d.deleted is True
    # The batch still references it and is unchanged.
    assert client.batches.retrieve(b.id).status == "completed"


def test_deleting_while_paging_empties_the_list(launcher, mock):
    """Issue 19: the SDK's auto-pagination asks each next page `after` the last file of the
    page, which this loop has just deleted; the loop empties the list instead of stopping
    with a 400 after two deletes."""
    own = launcher.server(upstream=mock.base_url).client()
    ids = [upload(own, SAMPLE, filename=f"page-{i}.jsonl").id for i in range(5)]
    deleted = []
    for f in own.files.list(limit=2):
        assert own.files.delete(f.id).deleted
        deleted.append(f.id)
    assert deleted == ids[::-1], "every file, newest first, each once"
    assert own.files.list().data == []
