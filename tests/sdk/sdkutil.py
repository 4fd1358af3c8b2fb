"""Helpers shared by the SDK end-to-end tests (no fixtures here; see conftest.py).

Everything talks to batchd through the official `openai` SDK. The SDK's own HTTP
library (`httpx2` since openai 3.x) is used only for what the SDK cannot express.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import httpx2 as http  # the HTTP library the installed openai SDK is built on
import openai
from openai.types import Batch, FileObject

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "target" / "debug" / "batchd"

FINAL = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
MODEL = "gpt-4o-mini"
SLOW_MODEL = "slow-mini"  # served by the second upstream ("mock-slow"), small concurrency

# The File purposes the SDK's FileObject type knows; `purpose=` on upload is narrower.
ERROR_KEYS = ("message", "type", "param", "code")


# ----------------------------------------------------------------------------- processes


class Proc:
    """A child process whose stdout is drained by a thread into a log file.

    stderr goes straight to a file, so neither pipe can ever fill up and block the child.
    """

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, ready: str | None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.args = [str(a) for a in args]
        log_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while (log_dir / f"{name}.{n}.stdout.log").exists():
            n += 1
        self.stdout_path = log_dir / f"{name}.{n}.stdout.log"
        self.stderr_path = log_dir / f"{name}.{n}.stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        self._ready_re = re.compile(ready) if ready else None
        self._ready = threading.Event()
        self.match: re.Match[str] | None = None
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env if env is not None else child_env(),
            start_new_session=True,  # a stray Ctrl-C in the terminal goes to pytest only
        )
        _LIVE.add(self)
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        with open(self.stdout_path, "wb") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                out.write(raw)
                out.flush()
                if self._ready_re is not None and not self._ready.is_set():
                    m = self._ready_re.search(raw.decode("utf-8", "replace"))
                    if m:
                        self.match = m
                        self._ready.set()
        self._ready.set()  # EOF: wake a waiter, who then sees there was no match

    def wait_ready(self, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.1):
                break
        if self.match is None:
            rc = self.proc.poll()
            self.stop()
            state = f"exited with code {rc}" if rc is not None else f"not ready after {timeout:.0f}s"
            raise RuntimeError(f"{self.name} {state}: {' '.join(self.args)}\n{self.log_tail()}")
        return self.match

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig`, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drain.join(5)
        self._stderr.close()
        _LIVE.discard(self)
        return self.proc.returncode

    def output(self) -> str:
        text = ""
        for p in (self.stdout_path, self.stderr_path):
            try:
                text += p.read_text("utf-8", "replace")
            except FileNotFoundError:
                pass
        return text

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            try:
                tail = p.read_text("utf-8", "replace").splitlines()[-lines:]
            except FileNotFoundError:
                tail = []
            parts.append(f"--- {p.name} (last {lines} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)


_LIVE: "set[Proc]" = set()


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: no spawned process outlives the pytest run, even after an abort."""
    for p in list(_LIVE):
        if p.proc.poll() is None:
            p.proc.kill()


def child_env() -> dict[str, str]:
    """The environment for spawned binaries: ours, minus anything that configures batchd or
    an OpenAI client behind the test's back (BATCHD_*, OPENAI_*)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BATCHD_") and not k.startswith("OPENAI_")}
    env.setdefault("RUST_BACKTRACE", "1")
    return env


def loopback(url: str) -> str:
    """A server bound to 0.0.0.0 / [::] is reached on loopback."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


class MockUpstream:
    def __init__(self, proc: Proc, url: str):
        self.proc = proc
        self.url = url.rstrip("/")
        self.base_url = self.url + "/v1"

    def stats(self) -> dict[str, Any]:
        r = http.get(self.url + "/stats", timeout=10)
        r.raise_for_status()
        return r.json()

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def reset(self) -> None:
        http.post(self.url + "/stats/reset", timeout=10).raise_for_status()

    def configure(self, **behaviour: Any) -> None:
        http.post(self.url + "/config", json=behaviour, timeout=10).raise_for_status()


class Server:
    def __init__(self, proc: Proc, url: str, data_dir: Path, config_path: Path | None):
        self.proc = proc
        self.url = url.rstrip("/")
        self.data_dir = data_dir
        self.config_path = config_path
        self._clients: list[openai.OpenAI] = []

    def client(self, key: str | None = None, **kw: Any) -> openai.OpenAI:
        """An SDK client; with no tenants configured any key string does."""
        c = openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=key or "sk-unused",
            max_retries=kw.pop("max_retries", 0),
            timeout=kw.pop("timeout", 30.0),
            **kw,
        )
        self._clients.append(c)
        return c

    def http(self, key: str | None = None) -> http.Client:
        """A plain HTTP client (the SDK's own httpx2) for what the SDK cannot send."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return http.Client(base_url=self.url, headers=headers, timeout=30.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        return self.proc.stop(sig, timeout)


# ----------------------------------------------------------------------------- config


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string


def toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(toml_str(i) for i in items) + "]"


def make_config(
    upstream_base_url: str,
    *,
    tenants: dict[str, list[str]] | None = None,
    windows: Sequence[str] = ("24h", "1h", "2s"),
    max_concurrency: int = 16,
    slow_concurrency: int | None = 2,
    max_lines: int = 50,
    max_file_bytes: int = 100_000,
    max_upload_bytes: int = 200_000,
) -> str:
    """The TOML config the fixtures write. A second upstream on the same mock, `mock-slow`,
    serves only SLOW_MODEL with a small concurrency (for cancel / expiry / restart tests)."""
    out: list[str] = []
    for name, keys in (tenants or {}).items():
        out += ["[[tenants]]", f"name = {toml_str(name)}", f"api_keys = {toml_list(keys)}", ""]
    out += [
        "[[upstreams]]",
        'name = "mock"',
        f"base_url = {toml_str(upstream_base_url)}",
        f'models = {toml_list([MODEL, "text-embedding-3-small"])}',
        'aliases = { "gpt-4o" = "gpt-4o-mini", "mini" = "gpt-4o-mini" }',
        f"max_concurrency = {max_concurrency}",
        "",
    ]
    if slow_concurrency:
        out += [
            "[[upstreams]]",
            'name = "mock-slow"',
            f"base_url = {toml_str(upstream_base_url)}",
            f"models = {toml_list([SLOW_MODEL])}",
            f"max_concurrency = {slow_concurrency}",
            "",
        ]
    out += [
        "[batches]",
        f"completion_windows = {toml_list(windows)}",
        "",
        "[limits]",
        f"max_lines = {max_lines}",
        f"max_file_bytes = {max_file_bytes}",
        f"max_upload_bytes = {max_upload_bytes}",
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- input files


def chat_line(custom_id: str, *, model: str = MODEL, content: str = "Say hello.",
              mock: dict[str, Any] | None = None, url: str = CHAT, **body_extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    body.update(body_extra)
    if mock is not None:
        body["mock"] = mock
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def embed_line(custom_id: str, text: str = "a document", model: str = "text-embedding-3-small") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": EMBED, "body": {"model": model, "input": text}}


def write_jsonl(lines: Iterable[Any]) -> bytes:
    """dicts are JSON-encoded, str / bytes are taken verbatim (for malformed lines)."""
    out = bytearray()
    for line in lines:
        if isinstance(line, bytes):
            out += line
        elif isinstance(line, str):
            out += line.encode()
        else:
            out += json.dumps(line, separators=(",", ":")).encode()
        out += b"\n"
    return bytes(out)


def upload(client: openai.OpenAI, data: bytes | list[Any], *, purpose: str = "batch",
           filename: str = "input.jsonl", **kw: Any) -> FileObject:
    if not isinstance(data, (bytes, bytearray)):
        data = write_jsonl(data)
    return client.files.create(file=(filename, bytes(data), "application/jsonl"), purpose=purpose, **kw)


def start_batch(client: openai.OpenAI, lines: bytes | list[Any], *, endpoint: str = CHAT,
                window: str = "24h", **kw: Any) -> Batch:
    f = upload(client, lines)
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window=window, **kw)


# ----------------------------------------------------------------------------- polling


def wait_for(client: openai.OpenAI, batch_id: str, statuses: str | Sequence[str] = FINAL,
             timeout: float = 30.0, interval: float = 0.1, until=None) -> Batch:
    """Poll batches.retrieve until the status is one of `statuses` (and `until(batch)` holds)."""
    if isinstance(statuses, str):
        statuses = (statuses,)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        b = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in statuses and (until is None or until(b)):
            return b
        if b.status in FINAL and b.status not in statuses:
            raise AssertionError(f"batch {batch_id} ended {b.status!r}, wanted {statuses}; "
                                 f"statuses seen {seen}; batch: {b.model_dump_json()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} not {statuses} after {timeout}s; "
                                 f"statuses seen {seen}; batch: {b.model_dump_json()}")
        time.sleep(interval)


def run_batch(client: openai.OpenAI, lines: bytes | list[Any], *, timeout: float = 30.0, **kw: Any) -> Batch:
    b = start_batch(client, lines, **kw)
    return wait_for(client, b.id, FINAL, timeout)


# ----------------------------------------------------------------------------- results


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    data = client.files.content(file_id).read()
    return [json.loads(l) for l in data.decode().splitlines() if l.strip()]


def results(client: openai.OpenAI, batch: Batch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)


def assert_each_once(output: list[dict], errors: list[dict], custom_ids: Iterable[str]) -> None:
    got = Counter(l["custom_id"] for l in output + errors)
    want = Counter(custom_ids)
    dup = {k: n for k, n in got.items() if n > 1}
    assert not dup, f"custom_ids appearing more than once across output+error: {dup}"
    assert set(got) == set(want), (f"missing: {sorted(set(want) - set(got))}, "
                                   f"unexpected: {sorted(set(got) - set(want))}")


def raw_batch(client: openai.OpenAI, batch_id: str) -> dict[str, Any]:
    return client.batches.with_raw_response.retrieve(batch_id).http_response.json()


def raw_file(client: openai.OpenAI, file_id: str) -> dict[str, Any]:
    return client.files.with_raw_response.retrieve(file_id).http_response.json()


def error_codes(batch: Batch) -> list[tuple[str | None, int | None, str | None]]:
    data = (batch.errors.data if batch.errors else None) or []
    return [(e.code, e.line, e.param) for e in data]


def assert_envelope(body: Any, *, code: str | None = None, param: Any = ..., status: int | None = None) -> dict:
    """`body` is the whole JSON answer. Checks the OpenAI error envelope shape."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an error envelope: {body!r}"
    err = body["error"]
    for k in ERROR_KEYS:
        assert k in err, f"error envelope lacks {k!r}: {body!r}"
    assert isinstance(err["message"], str) and err["message"].strip(), f"empty error message: {body!r}"
    assert isinstance(err["type"], str) and err["type"], f"error.type not a string: {body!r}"
    if code is not None:
        assert err["code"] == code, f"error.code {err['code']!r} != {code!r}: {body!r}"
    if param is not ...:
        assert err["param"] == param, f"error.param {err['param']!r} != {param!r}: {body!r}"
    return err


def envelope_of(exc: openai.APIStatusError) -> dict:
    """The full JSON answer behind an SDK status error (exc.body is only its `error` member)."""
    try:
        return exc.response.json()
    except Exception as e:  # pragma: no cover - a failure message, not a path
        raise AssertionError(f"error answer is not JSON ({exc.status_code}): {exc.response.text[:500]!r}") from e


def assert_http_envelope(r: http.Response, status: int | Sequence[int], **kw: Any) -> dict:
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert r.status_code < 500, f"server error {r.status_code}: {r.text[:500]!r}"
    assert r.status_code in statuses, f"status {r.status_code} not in {statuses}: {r.text[:500]!r}"
    ctype = r.headers.get("content-type", "")
    assert "json" in ctype, f"error answer content-type {ctype!r}, body {r.text[:300]!r}"
    try:
        body = r.json()
    except Exception as e:
        raise AssertionError(f"error answer is not JSON: {r.text[:500]!r}") from e
    return assert_envelope(body, **kw)


def model_fields(model_cls: type) -> list[str]:
    fields = getattr(model_cls, "model_fields", None) or getattr(model_cls, "__fields__")
    return list(fields)


def missing_keys(raw: dict[str, Any], model_cls: type) -> list[str]:
    """SDK fields absent from the raw JSON (an optional field must still be present, as null)."""
    return [k for k in model_fields(model_cls) if k not in raw]
