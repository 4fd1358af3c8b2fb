"""Issue #10 as the SDK sees it: request ids, a 409 the SDK does not retry, the image and video
batch endpoints, the default expiry of batch files, Idempotency-Key reuse, repeated JSON keys,
ignored malformed ranges and non-ASCII file names. Issue #19: an unknown create parameter is the
hosted API's 400, `client.models.retrieve`, a stable `created`, and the envelope and request id
on an answer to a request the HTTP parser refuses (raw socket, and through the SDK)."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import quote, urlsplit

import httpx2
import openai
import pytest

from sdkutil import CHAT, MODEL, assert_envelope, chat_line, envelope_of, upload, wait_for, write_jsonl

THIRTY_DAYS = 30 * 86_400


def counting_client(server):
    """An SDK client with the SDK's default retries whose every HTTP request is counted."""
    sent: list[str] = []
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda r: sent.append(f"{r.method} {r.url.path}")]})
    return server.client(max_retries=2, http_client=http_client), sent


def test_every_response_has_a_request_id(client):
    f = upload(client, [chat_line("rid-1")])
    assert isinstance(f._request_id, str) and f._request_id.startswith("req_"), f._request_id
    again = client.files.retrieve(f.id)
    assert again._request_id.startswith("req_") and again._request_id != f._request_id
    mine = client.files.retrieve(f.id, extra_headers={"X-Request-Id": "sdk-chosen-7"})
    assert mine._request_id == "sdk-chosen-7", "the client's own id is echoed"
    with pytest.raises(openai.NotFoundError) as ei:
        client.batches.retrieve("batch_doesnotexist000000000000")
    assert ei.value.request_id and ei.value.request_id.startswith("req_"), "errors carry one too"


def test_reused_idempotency_key_is_409_and_not_retried(server):
    c, sent = counting_client(server)
    f = upload(c, [chat_line("idem-1")])
    key = f"idem-{uuid.uuid4()}"
    first = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                             metadata={"a": "1"}, extra_headers={"Idempotency-Key": key})
    same = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                            metadata={"a": "1"}, extra_headers={"Idempotency-Key": key})
    assert same.id == first.id
    sent.clear()
    with pytest.raises(openai.ConflictError) as ei:
        c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                         metadata={"a": "2"}, extra_headers={"Idempotency-Key": key})
    assert ei.value.status_code == 409
    assert ei.value.code == "idempotency_key_reused"
    assert ei.value.response.headers.get("x-should-retry") == "false"
    assert_envelope(envelope_of(ei.value), code="idempotency_key_reused")
    assert sent == ["POST /v1/batches"], f"the SDK retried a 409: {sent}"
    mine = [b for b in c.batches.list(limit=100) if b.input_file_id == f.id]
    assert [b.id for b in mine] == [first.id], "the conflict created nothing"
    assert c.batches.retrieve(first.id).metadata == {"a": "1"}
    wait_for(c, first.id, ("completed",))


def test_sdk_sends_no_idempotency_key_by_default(server):
    seen: list[str | None] = []
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda r: seen.append(r.headers.get("idempotency-key"))]})
    c = server.client(http_client=http_client)
    f = upload(c, [chat_line("nokey-1")])
    b = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert seen[-1] is None, "the README says the SDK sends none; it must not"
    wait_for(c, b.id, ("completed",))


@pytest.mark.parametrize("endpoint", ["/v1/images/generations", "/v1/images/edits", "/v1/videos"])
def test_image_and_video_endpoints_are_accepted(client, endpoint):
    line = {"custom_id": "img-1", "method": "POST", "url": endpoint, "body": {"model": "gpt-4o-mini", "prompt": "a cat"}}
    f = upload(client, [line])
    b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    assert b.endpoint == endpoint
    done = wait_for(client, b.id)
    assert done.request_counts.total == 1, done


def test_batch_files_expire_after_30_days_by_default(client):
    f = upload(client, [chat_line("exp-1")])
    assert f.expires_at == f.created_at + THIRTY_DAYS
    assert client.files.retrieve(f.id).expires_at == f.created_at + THIRTY_DAYS
    short = upload(client, [chat_line("exp-2")], expires_after={"anchor": "created_at", "seconds": 7200})
    assert short.expires_at == short.created_at + 7200
    other = upload(client, b"x", purpose="user_data", filename="x.bin")
    assert other.expires_at is None


def test_repeated_keys_in_a_create_body_are_refused(client):
    f = upload(client, [chat_line("dup-1")])
    body = ('{"input_file_id": "%s", "endpoint": "/v1/chat/completions", "endpoint": "/v1/embeddings", '
            '"completion_window": "24h"}' % f.id).encode()
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/batches", cast_to=httpx2.Response, content=body,
                    options={"headers": {"Content-Type": "application/json"}})
    assert "endpoint" in ei.value.message
    assert_envelope(envelope_of(ei.value))
    assert all(b.input_file_id != f.id for b in client.batches.list(limit=100))


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=0-1,4-5", "items=0-3", "bytes=7-2"])
def test_unusable_ranges_are_ignored(client, header):
    data = b"0123456789"
    f = upload(client, data, purpose="user_data", filename="r.bin")
    r = client.files.with_raw_response.content(f.id, extra_headers={"Range": header})
    assert r.status_code == 200
    assert r.http_response.content == data


def test_non_ascii_file_names_are_kept_and_sent_back_rfc5987(client):
    name = "données ✓.jsonl"
    f = upload(client, write_jsonl([chat_line("n-1")]), filename=name)
    assert f.filename == name
    r = client.files.with_raw_response.content(f.id)
    cd = r.headers.get("content-disposition")
    assert f"filename*=UTF-8''{quote(name, safe='')}" in cd, cd
    assert 'filename="donn_es _.jsonl"' in cd, cd


def test_an_unknown_create_parameter_is_the_hosted_apis_400(server):
    c, sent = counting_client(server)
    f = upload(c, [chat_line("unknown-1")])
    with pytest.raises(openai.BadRequestError) as ei:
        c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", extra_body={"metdata": {"run": "1"}})
    assert ei.value.body["message"] == "Unrecognized request argument supplied: metdata"
    assert_envelope(envelope_of(ei.value), param=None)
    assert envelope_of(ei.value)["error"]["type"] == "invalid_request_error"
    assert sent.count("POST /v1/batches") == 1, f"a 400 is not retried: {sent}"
    assert all(b.input_file_id != f.id for b in c.batches.list(limit=100)), "nothing was created"
    b = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", extra_body={"priority": 2})
    wait_for(c, b.id, ("completed",))


def test_models_retrieve_and_a_stable_created(client):
    listed = {m.id: m for m in client.models.list()}
    again = {m.id: m for m in client.models.list()}
    assert {k: m.created for k, m in listed.items()} == {k: m.created for k, m in again.items()}, "created is stable"
    for model_id in (MODEL, "mini"):
        m = client.models.retrieve(model_id)
        assert (m.id, m.object, m.created, m.owned_by) == (model_id, "model", listed[model_id].created, listed[model_id].owned_by)
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert_envelope(envelope_of(ei.value), code="model_not_found", param="model")


def raw_answer(url: str, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Sends `request` on a raw socket and reads the answer to its end (the server closes)."""
    host = urlsplit(url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return lines[0], headers, body


def test_requests_the_http_parser_refuses_get_the_envelope(server):
    status, headers, body = raw_answer(server.url, b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
    assert status.startswith("HTTP/1.1 400"), status
    assert headers["x-request-id"].startswith("req_"), headers
    assert_envelope(json.loads(body), code="malformed_request")
    c = server.client()
    with pytest.raises(openai.APIStatusError) as ei:
        c.files.list(extra_headers={f"X-Many-{i}": "v" for i in range(150)})
    assert ei.value.status_code == 431
    assert ei.value.request_id and ei.value.request_id.startswith("req_"), "the SDK reads the request id"
    assert_envelope(envelope_of(ei.value), code="request_header_fields_too_large")
