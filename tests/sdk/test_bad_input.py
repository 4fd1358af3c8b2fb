"""Malformed requests: each answer is an OpenAI error envelope with the right status, never a
500, and the server's existing files and batches are untouched afterwards."""

from __future__ import annotations

import httpx2
import openai
import pytest

from sdkutil import (
    CHAT,
    assert_envelope,
    assert_http_envelope,
    chat_line,
    envelope_of,
    raw_batch,
    raw_file,
    run_batch,
    upload,
)

BOUNDARY = "batchd-test-boundary"


@pytest.fixture(scope="module")
def baseline(client):
    """Objects that must survive everything below unchanged."""
    data = b'{"hello": "world"}\n'
    user = upload(client, data, purpose="user_data", filename="baseline.jsonl")
    done = run_batch(client, [chat_line("base-1"), chat_line("base-2")], metadata={"suite": "bad-input"})
    assert done.status == "completed", done
    snap = {
        "files": {fid: raw_file(client, fid) for fid in (user.id, done.input_file_id, done.output_file_id)},
        "contents": {fid: client.files.content(fid).read() for fid in (user.id, done.input_file_id,
                                                                        done.output_file_id)},
        "batch": raw_batch(client, done.id),
        "batch_id": done.id,
    }
    return snap


@pytest.fixture(scope="module")
def http(server):
    with server.http("sk-unused") as h:
        yield h


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    out = b""
    for name, filename, value in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: application/jsonl\r\n"
        out += b"\r\n" + value + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


FILE_PART = ("file", "in.jsonl", b'{"custom_id":"a"}\n')
PURPOSE_PART = ("purpose", None, b"batch")
MP = f"multipart/form-data; boundary={BOUNDARY}"


# ----------------------------------------------------------------------------- POST /v1/files


@pytest.mark.parametrize("content_type,body,param", [
    pytest.param(MP, multipart([FILE_PART, PURPOSE_PART], boundary="some-other-boundary"), ...,
                 id="boundary-mismatch"),
    pytest.param(MP, multipart([FILE_PART, PURPOSE_PART], close=False), ..., id="no-closing-boundary"),
    pytest.param(MP, multipart([FILE_PART, PURPOSE_PART])[:40], ..., id="truncated"),
    pytest.param("multipart/form-data", multipart([FILE_PART, PURPOSE_PART]), ..., id="no-boundary-param"),
    pytest.param(MP, b"", ..., id="empty-body"),
    pytest.param(MP, b"\x00\xff garbage \r\n\r\n--", ..., id="garbage"),
    pytest.param(MP, multipart([PURPOSE_PART]), "file", id="missing-file"),
    pytest.param(MP, multipart([FILE_PART]), "purpose", id="missing-purpose"),
    pytest.param(MP, multipart([FILE_PART, ("purpose", None, b"nonsense")]), "purpose", id="bad-purpose"),
    pytest.param(MP, multipart([FILE_PART, PURPOSE_PART, ("expires_after[anchor]", None, b"created_at"),
                                ("expires_after[seconds]", None, b"soon")]), ..., id="expires-not-int"),
])
def test_bad_upload(http, baseline, content_type, body, param):
    r = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_http_envelope(r, 400, param=param)


@pytest.mark.parametrize("content_type,body", [
    ("application/json", b'{"purpose": "batch", "file": "abc"}'),
    ("application/x-www-form-urlencoded", b"purpose=batch&file=abc"),
    ("text/plain", b"hello"),
])
def test_upload_not_multipart(http, content_type, body):
    r = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_http_envelope(r, (400, 415))


def test_missing_file_field_via_sdk(client):
    # The SDK can send a multipart form without the file: files=[] with a purpose only.
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/files", cast_to=httpx2.Response, body={"purpose": "batch"},
                    files=[("unrelated", ("x.txt", b"x", "text/plain"))],
                    options={"headers": {"Content-Type": "multipart/form-data"}})
    assert ei.value.param == "file"
    assert_envelope(envelope_of(ei.value), param="file")


# ----------------------------------------------------------------------------- POST /v1/batches


@pytest.mark.parametrize("body", [
    pytest.param(b"this is not json", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"input_file_id": "file-x", "endpoint": ', id="truncated-json"),
    pytest.param(b'["input_file_id", "endpoint"]', id="array"),
    pytest.param(b'"a string"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"input_file_id": "\xff\xfe", "endpoint": "/v1/chat/completions"}', id="invalid-utf8"),
])
def test_create_batch_malformed_json(client, body):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/batches", cast_to=httpx2.Response, content=body,
                    options={"headers": {"Content-Type": "application/json"}})
    assert_envelope(envelope_of(ei.value))


def test_create_batch_without_json_content_type(http):
    r = http.post("/v1/batches", content=b"input_file_id=file-x", headers={"Content-Type": "text/plain"})
    assert_http_envelope(r, (400, 415))


@pytest.mark.parametrize("fields,param", [
    pytest.param({"endpoint": 5}, "endpoint", id="endpoint-int"),
    pytest.param({"completion_window": 24}, "completion_window", id="window-int"),
    pytest.param({"completion_window": None}, "completion_window", id="window-null"),
    pytest.param({"input_file_id": ["file-x"]}, "input_file_id", id="file-id-list"),
    pytest.param({"metadata": "not an object"}, "metadata", id="metadata-string"),
    pytest.param({"metadata": {"k": 5}}, "metadata", id="metadata-value-int"),
])
def test_create_batch_wrong_types(client, baseline, fields, param):
    args = {"input_file_id": baseline["batch"]["input_file_id"], "endpoint": CHAT, "completion_window": "24h"}
    args.update(fields)
    with pytest.raises(openai.BadRequestError) as ei:
        client.batches.create(**args)  # the SDK sends whatever it is given
    err = assert_envelope(envelope_of(ei.value))
    assert err["param"] == param or param in err["message"], \
        f"the error should say which field is wrong ({param}): {err}"


@pytest.mark.parametrize("body,param", [
    pytest.param({}, None, id="empty-object"),
    pytest.param({"endpoint": CHAT, "completion_window": "24h"}, "input_file_id", id="no-input-file"),
    pytest.param({"input_file_id": "file-x", "completion_window": "24h"}, "endpoint", id="no-endpoint"),
    pytest.param({"input_file_id": "file-x", "endpoint": CHAT}, "completion_window", id="no-window"),
])
def test_create_batch_missing_fields(client, body, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.post("/batches", cast_to=httpx2.Response, body=body)
    err = assert_envelope(envelope_of(ei.value))
    if param is not None:
        assert err["param"] == param or param in err["message"], err


def test_create_batch_huge_body(client):
    body = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h",
            "metadata": {"k": "v" * 3_000_000}}
    with pytest.raises(openai.APIStatusError) as ei:
        client.post("/batches", cast_to=httpx2.Response, body=body)
    assert ei.value.status_code in (400, 413), ei.value.status_code
    assert_envelope(envelope_of(ei.value))


# ----------------------------------------------------------------------------- routes, ids, queries


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/nope"),
    ("POST", "/v1/nope"),
    ("GET", "/v1/files/file-x/content/extra"),
    ("GET", "/v1/batches/batch_x/cancel/extra"),
    ("GET", "/nope"),
    ("GET", "/v2/files"),
])
def test_unknown_route_is_404(http, method, path):
    r = http.request(method, path)
    assert_http_envelope(r, 404)


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/v1/batches"),
    ("PUT", "/v1/files"),
    ("GET", "/v1/batches/batch_x/cancel"),
    ("PATCH", "/v1/files/file-x"),
])
def test_wrong_method_is_an_envelope(http, method, path):
    r = http.request(method, path)
    assert_http_envelope(r, (404, 405))


@pytest.mark.parametrize("path", [
    "/v1/files/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/files/..%2F..%2F..%2Fetc%2Fpasswd/content",
    "/v1/files/file-" + "a" * 5000,
    "/v1/files/%00",
    "/v1/batches/batch_%2F..%2F",
    "/v1/batches/" + "b" * 5000,
])
def test_weird_ids_are_404(http, path):
    r = http.get(path)
    assert_http_envelope(r, (400, 404))
    assert b"root:" not in r.content


@pytest.mark.parametrize("path,param", [
    ("/v1/files?limit=abc", "limit"),
    ("/v1/files?limit=-1", "limit"),
    ("/v1/files?order=sideways", "order"),
    ("/v1/batches?limit=abc", "limit"),
    ("/v1/batches?limit=1000", "limit"),
])
def test_bad_query_is_400(http, path, param):
    r = http.get(path)
    assert_http_envelope(r, 400, param=param)


def test_unknown_after_cursor_does_not_500(client):
    # Not specified by the contract: an unknown cursor may be 400/404 or an empty page, never 500.
    try:
        page = client.batches.list(after="batch_doesnotexist")
        assert page.data is not None
    except openai.APIStatusError as e:
        assert e.status_code in (400, 404), e.status_code
        assert_envelope(envelope_of(e))


# ----------------------------------------------------------------------------- still intact


def test_everything_still_intact(client, server, baseline):
    """Runs last: after all the abuse, the server is healthy and the baseline unchanged."""
    assert server.proc.proc.poll() is None, "batchd died\n" + server.proc.log_tail()
    with server.http() as h:
        assert h.get("/healthz").status_code == 200
    for fid, raw in baseline["files"].items():
        assert raw_file(client, fid) == raw
        assert client.files.content(fid).read() == baseline["contents"][fid]
    assert raw_batch(client, baseline["batch_id"]) == baseline["batch"]
    listed_files = {f.id for f in client.files.list()}
    assert set(baseline["files"]) <= listed_files
    assert baseline["batch_id"] in {b.id for b in client.batches.list(limit=100)}
    # and it still does real work
    assert run_batch(client, [chat_line("after-abuse")]).status == "completed"
