"""Input-file validation: every problem reported with its code, 1-based line and param;
the batch fails with nothing sent upstream. Limits here: max_lines 50, max_file_bytes 100000."""

from __future__ import annotations

import json

import pytest

from sdkutil import (
    CHAT,
    MODEL,
    chat_line,
    error_codes,
    upload,
    wait_for,
    write_jsonl,
)

OK = chat_line  # a valid line


def line(custom_id="x", method="POST", url=CHAT, body=..., drop=(), **body_kw):
    """A full request line; `drop` removes top-level keys, body=... means a valid chat body."""
    d = chat_line(custom_id, url=url, **body_kw)
    d["method"] = method
    if body is not ...:
        d["body"] = body
    for k in drop:
        d.pop(k)
    return d


def no_model():
    d = chat_line("nm")
    del d["body"]["model"]
    return d


def run_invalid(client, mock, content, timeout=30.0):
    before = mock.requests()
    f = upload(client, content)
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert b.status in ("validating", "failed"), b
    done = wait_for(client, b.id, ("failed",), timeout=timeout)
    assert done.failed_at is not None
    assert done.in_progress_at is None, "a batch that failed validation never ran"
    assert done.output_file_id is None
    assert done.errors is not None and done.errors.data, f"failed without errors: {done}"
    assert mock.requests() == before, "a batch that fails validation must send nothing upstream"
    return done


# (id, lines, [(code, line, param)]) -- the lines are dicts (JSON-encoded) or raw strings.
CASES = [
    ("invalid-json", [OK("a"), "{not json", OK("c")], [("invalid_json_line", 2, None)]),
    ("json-not-object", [OK("a"), "[1, 2, 3]", OK("c")], [("invalid_json_line", 2, None)]),
    ("json-scalar", ['"just a string"', OK("b")], [("invalid_json_line", 1, None)]),
    ("missing-custom-id", [OK("a"), line(drop=("custom_id",))],
     [("missing_required_parameter", 2, "custom_id")]),
    ("missing-method", [line("a", drop=("method",))], [("missing_required_parameter", 1, "method")]),
    ("missing-url", [OK("a"), OK("b"), line("c", drop=("url",))], [("missing_required_parameter", 3, "url")]),
    ("missing-body", [line("a", drop=("body",))], [("missing_required_parameter", 1, "body")]),
    ("missing-body-model", [OK("a"), no_model()], [("missing_required_parameter", 2, "body.model")]),
    ("method-get", [line("a", method="GET")], [("invalid_value", 1, "method")]),
    ("custom-id-number", [OK("a"), line(5)], [("invalid_value", 2, "custom_id")]),
    ("custom-id-empty", [line("")], [("invalid_value", 1, "custom_id")]),
    ("custom-id-too-long", [line("x" * 513)], [("invalid_value", 1, "custom_id")]),
    ("body-not-object", [line("a", body="hello")], [("invalid_value", 1, "body")]),
    ("body-array", [OK("a"), line("b", body=[1])], [("invalid_value", 2, "body")]),
    ("duplicate-custom-id", [OK("a"), OK("b"), OK("a")], [("duplicate_custom_id", 3, "custom_id")]),
    ("url-differs", [OK("a"), line("b", url="/v1/embeddings")], [("invalid_url", 2, "url")]),
    ("model-not-found", [OK("a"), OK("b", model="no-such-model")], [("model_not_found", 2, "body.model")]),
    ("stream-true", [OK("a", stream=True)], [("unsupported_value", 1, "body.stream")]),
    ("mixed-bare-minority", [OK("a"), OK("b"), OK("c"), {"model": MODEL, "messages": []}],
     [("invalid_value", 4, None)]),
    ("mixed-full-minority", [{"model": MODEL, "messages": []}, OK("b"), {"model": MODEL, "messages": []},
                             {"model": MODEL, "messages": []}],
     [("invalid_value", 2, None)]),
]
FILE_LEVEL = {"empty_file", "too_many_requests", "file_too_large"}


@pytest.mark.parametrize("lines,expected", [pytest.param(l, e, id=i) for i, l, e in CASES])
def test_single_problem(client, mock, lines, expected):
    done = run_invalid(client, mock, write_jsonl(lines))
    got = error_codes(done)
    for code, lno, param in expected:
        matches = [g for g in got if g[0] == code and g[1] == lno]
        assert matches, f"expected {code} on line {lno}; got {got}"
        if param is not None:
            assert any(g[2] == param for g in matches), f"expected param {param!r} for {code}; got {got}"
    expected_lines = {lno for _, lno, _ in expected}
    stray = [g for g in got if g[1] not in expected_lines]
    assert not stray, f"errors reported on lines that are fine: {stray} (expected {expected})"
    for e in done.errors.data:
        assert e.message, f"error without a message: {e}"


def test_model_not_found_lists_known_models(client, mock):
    done = run_invalid(client, mock, write_jsonl([OK("a", model="gpt-9-imaginary")]))
    (err,) = [e for e in done.errors.data if e.code == "model_not_found"]
    assert err.line == 1 and err.param == "body.model"
    assert MODEL in err.message, f"message should list the known models: {err.message!r}"
    assert "gpt-9-imaginary" in err.message


@pytest.mark.parametrize("content", [b"", b"\n\n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file(client, mock, content):
    done = run_invalid(client, mock, content)
    codes = error_codes(done)
    assert [c for c in codes if c[0] == "empty_file"], codes
    assert all(c[2] is None for c in codes if c[0] == "empty_file"), codes


def test_blank_lines_are_ignored(client, mock):
    """Blank lines and a final newline are not errors (and do not shift line numbers)."""
    content = write_jsonl([OK("a"), ""]) + b"\n" + write_jsonl([OK("b")])
    f = upload(client, content)
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, b.id, timeout=30)
    assert done.status == "completed", done
    assert done.request_counts.total == 2
    # and line numbers count physical lines: the bad line is line 4
    done = run_invalid(client, mock, write_jsonl([OK("a"), "", "", "{broken"]))
    assert ("invalid_json_line", 4, None) in error_codes(done)


def test_too_many_lines(client, mock):
    done = run_invalid(client, mock, write_jsonl([OK(f"r{i}") for i in range(51)]))
    codes = error_codes(done)
    assert [c for c in codes if c[0] == "too_many_requests"], codes
    assert all(c[2] is None for c in codes if c[0] == "too_many_requests"), codes


def test_exactly_max_lines_is_fine(client, mock):
    f = upload(client, [OK(f"r{i}") for i in range(50)])
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, b.id, timeout=30)
    assert done.status == "completed", done
    assert done.request_counts.completed == 50


def test_file_too_large(client, mock):
    # 10 lines of ~11 KB: over max_file_bytes (100000) but under the upload limit and line limit.
    content = write_jsonl([OK(f"big{i}", content="x" * 11_000) for i in range(10)])
    assert 100_000 < len(content) < 200_000
    done = run_invalid(client, mock, content)
    codes = error_codes(done)
    assert [c for c in codes if c[0] == "file_too_large"], codes
    assert all(c[2] is None for c in codes if c[0] == "file_too_large"), codes


def test_several_errors_all_reported(client, mock):
    lines = [
        OK("a"),                                      # 1 fine
        "{oops",                                      # 2 invalid_json_line
        line(drop=("custom_id",)),                    # 3 missing custom_id
        OK("a"),                                      # 4 duplicate of line 1
        OK("d", stream=True),                         # 5 stream
        OK("e", model="no-such-model"),               # 6 unknown model
        line("f", method="PUT"),                      # 7 method
        line("g", url="/v1/completions"),             # 8 url
        OK("h"),                                      # 9 fine
    ]
    done = run_invalid(client, mock, write_jsonl(lines))
    got = error_codes(done)
    want = [
        ("invalid_json_line", 2, None),
        ("missing_required_parameter", 3, "custom_id"),
        ("duplicate_custom_id", 4, "custom_id"),
        ("unsupported_value", 5, "body.stream"),
        ("model_not_found", 6, "body.model"),
        ("invalid_value", 7, "method"),
        ("invalid_url", 8, "url"),
    ]
    for w in want:
        assert w in got, f"missing {w}; got {got}"
    assert not [g for g in got if g[1] in (1, 9)], f"valid lines reported: {got}"
    assert done.errors.object == "list"
    assert len(got) == len(json.loads(done.errors.model_dump_json())["data"])
