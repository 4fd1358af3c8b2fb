#!/usr/bin/env python3
"""batchd benchmark harness (stdlib only). Normally started by bench/run.sh.

Measures the performance budgets of shared/DESIGN.md ("Performance budgets") and prints
one table. Every figure is compared with a baseline measured in the same run, because the
machine (2 cores, shared with compilers and other agents) is noisy.

Figures:
  dispatch   batchd throughput / wrk throughput, same instant mock, same connection count
  saturation batchd throughput / (C / L) with the mock at L = 200 ms and C = 256
  rss        peak RSS of `batchd serve` while a 100,000-line, 200 MB batch runs
  flat       100,000 and 1,000,000-line chat batches (300 bytes a line): peak RSS and
             throughput of both (ratios), finalization time against dispatch time, and the
             time from a restart after kill -9 mid-batch to the mock's next request
  commits    store commits per 1,000 results, from GET /metrics (n/a when absent)
  validation MB/s of `batchd validate FILE` (when the command exists) and of the server
             path (create -> in_progress), against `wc -l` on the same file
  limits     upstream citizenship with no limits configured (issue #11): 429 share and
             throughput / what the upstream serves against a 16-slot cap answering 429 and a
             1,200 rpm limiter with OpenAI's headers; standby mode's online latency ratio and
             batch share on a 16-slot server shared with 4 online clients

Everything is spawned on 127.0.0.1 only; every child is killed on exit (and its pid is
written to --pidfile so that run.sh's trap can kill it too if this script dies hard).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

MB = 1_000_000
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
FINAL = ("completed", "failed", "expired", "cancelled")

# ------------------------------------------------------------------------------ sizes

FULL = {
    "dispatch_lines": 20_000,
    "dispatch_concurrency": 64,
    "reps": 5,
    "dispatch_wrk_seconds": 4,
    "wrk_seconds": 10,
    "sat_lines": 25_600,  # 20 s at the ideal 1,280 req/s
    "sat_concurrency": 256,
    "sat_latency_ms": 200,
    "big_lines": 100_000,
    "big_bytes": 200 * MB,  # the size DESIGN.md names for the memory budget
    "big_concurrency": 64,
    "flat_lines": (100_000, 1_000_000),
    "flat_line_bytes": 300,
    "timeout_s": 300,
    "cap_lines": 8_000,  # 10 s at the 800 req/s a 16-slot, 20 ms upstream serves
    "rpm_lines": 600,  # the 600 lines at 1,200 rpm: 30 s
    "standby_seconds": 10,
    "stray_lines": 6_000,  # about 5 s at the 1,280 req/s of 64 × 50 ms
    "per_second_lines": 600,  # issue #20's 600 lines at 1,200 rpm held per second: 30 s
    "nginx_lines": 200,  # 10 s at 20 r/s
    "fast_lines": 20_000,
}
QUICK = {
    "dispatch_lines": 20_000,
    "dispatch_concurrency": 64,
    "reps": 2,
    "dispatch_wrk_seconds": 3,
    "wrk_seconds": 5,
    "sat_lines": 5_120,  # 4 s at the ideal 1,280 req/s
    "sat_concurrency": 256,
    "sat_latency_ms": 200,
    "big_lines": 20_000,
    "big_bytes": 40 * MB,
    "big_concurrency": 64,
    "flat_lines": (20_000, 200_000),
    "flat_line_bytes": 300,
    "timeout_s": 120,
    "cap_lines": 4_000,
    "rpm_lines": 300,
    "standby_seconds": 5,
    "stray_lines": 3_000,
    "per_second_lines": 300,
    "nginx_lines": 100,
    "fast_lines": 20_000,
}

# ------------------------------------------------------------------------------ processes

_CHILDREN: list[subprocess.Popen] = []
_PIDFILE: Path | None = None


def _register(p: subprocess.Popen) -> None:
    _CHILDREN.append(p)
    if _PIDFILE is not None:
        with open(_PIDFILE, "a") as f:
            f.write(f"{p.pid}\n")


def stop_proc(p: subprocess.Popen, timeout: float = 10.0) -> None:
    if p.poll() is None:
        try:
            p.terminate()
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass
    if p in _CHILDREN:
        _CHILDREN.remove(p)


def kill_all() -> None:
    for p in list(_CHILDREN):
        try:
            stop_proc(p, 5.0)
        except Exception:
            pass


def _on_signal(signum, _frame):
    kill_all()
    sys.exit(128 + signum)


def child_env() -> dict[str, str]:
    """The environment without any BATCHD_* / OPENAI_* setting that would change batchd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "OPENAI_"))}
    env["BATCHD_LOG"] = "batchd=warn"
    return env


class Server:
    """A child that prints `... listening on http://ADDR` on stdout when ready."""

    def __init__(self, name: str, args: list[str], cwd: Path, log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = open(log_dir / f"{name}.stderr.log", "wb")
        self.proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, env={**child_env(), **(env or {})})
        _register(self.proc)
        self.addr = self._wait_ready(args)

    def _wait_ready(self, args: list[str], timeout: float = 60.0) -> str:
        found: list[str] = []

        def read():
            assert self.proc.stdout is not None
            for raw in iter(self.proc.stdout.readline, b""):
                m = re.search(rb"listening on http://(\S+)", raw)
                if m and not found:
                    found.append(m.group(1).decode())
                    # keep draining so the pipe never fills
        t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        if not found:
            self.stop()
            tail = Path(self.log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start: {' '.join(args)}\n{tail}")
        host, _, port = found[0].rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            self.stop()
            raise RuntimeError(f"{self.name} listens on {found[0]}, not on loopback")
        return found[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_proc(self.proc)
        self.log.close()


# ------------------------------------------------------------------------------ HTTP


class Client:
    """A keep-alive HTTP/1.1 client for one loopback address."""

    def __init__(self, addr: str, timeout: float = 60.0):
        host, _, port = addr.rpartition(":")
        self.host, self.port, self.timeout = host.strip("[]"), int(port), timeout
        self.conn: http.client.HTTPConnection | None = None

    def _conn(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                c = self._conn()
                c.request(method, path, body=body, headers=headers or {})
                r = c.getresponse()
                return r.status, r.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, obj=None) -> dict:
        body = None if obj is None else json.dumps(obj).encode()
        st, data = self.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        if st >= 300:
            raise RuntimeError(f"{method} {path} -> {st}: {data[:500]!r}")
        return json.loads(data) if data else {}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def upload(addr: str, path: Path) -> tuple[str, float]:
    """Multipart upload of `path` to /v1/files (purpose=batch), streamed; returns (file id, seconds)."""
    host, _, port = addr.rpartition(":")
    b = uuid.uuid4().hex
    pre = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
           f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
           f"Content-Type: application/jsonl\r\n\r\n").encode()
    post = f"\r\n--{b}--\r\n".encode()
    size = path.stat().st_size
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.putrequest("POST", "/v1/files")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={b}")
    conn.putheader("Content-Length", str(len(pre) + size + len(post)))
    conn.endheaders()
    conn.send(pre)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            conn.send(chunk)
    conn.send(post)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"upload of {path.name} -> {r.status}: {data[:500]!r}")
    return json.loads(data)["id"], time.perf_counter() - t0


def read_metrics(api: Client) -> dict[str, float] | None:
    """Prometheus text from GET /metrics, summed per metric name; None when there is none."""
    try:
        st, data = api.request("GET", "/metrics")
    except Exception:
        return None
    if st != 200:
        return None
    sums: dict[str, float] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        sums[m.group(1)] = sums.get(m.group(1), 0.0) + v
    return sums


def counter(metrics: dict[str, float], name: str) -> float | None:
    for n in (name, name.removesuffix("_total")):
        if n in metrics:
            return metrics[n]
    return None


# ------------------------------------------------------------------------------ inputs

LOREM = ("the quick brown fox jumps over the lazy dog while a batch of requests waits in line "
         "for its turn at the upstream model and every answer is written to the output file "
         "in the order of the input lines so that nothing is lost when the process restarts ")
LOREM_LONG = (LOREM * (40_000 // len(LOREM) + 2))


def chat_body(i: int, content: str | None = None) -> dict:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": content if content is not None else f"Summarize support ticket {i} in one sentence."},
        ],
        "max_tokens": 64,
    }


def line_json(i: int, content: str | None = None) -> str:
    return json.dumps({"custom_id": f"req-{i:07d}", "method": "POST", "url": CHAT, "body": chat_body(i, content)},
                      separators=(",", ":"))


def write_small(path: Path, n: int) -> int:
    with open(path, "w") as f:
        for i in range(n):
            f.write(line_json(i) + "\n")
    return path.stat().st_size


def write_big(path: Path, n: int, total_bytes: int) -> int:
    """n lines whose sizes add up to exactly total_bytes (newlines included)."""
    per, extra = divmod(total_bytes, n)
    empty_len = len(line_json(0, "")) + 1  # + newline
    with open(path, "w") as f:
        buf = []
        for i in range(n):
            want = per + (1 if i < extra else 0)
            pad = want - empty_len
            if pad < 1:
                raise ValueError("lines too small for the requested size")
            start = (i * 37) % 20_000
            buf.append(line_json(i, LOREM_LONG[start:start + pad]) + "\n")
            if len(buf) == 1000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
    size = path.stat().st_size
    if size != total_bytes:
        raise RuntimeError(f"generated {size} bytes, wanted {total_bytes}")
    return size


# ------------------------------------------------------------------------------ measuring


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])  # kB
    except OSError:
        pass
    return out


class RssSampler(threading.Thread):
    """Samples VmRSS every 50 ms, keeping the peak per phase (set by the main thread)."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.phase = "before upload"
        self.peaks: dict[str, int] = {}
        self.peak_detail: dict[str, int] = {}  # the /proc status fields of the highest sample
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            st = proc_status(self.pid)
            kb = st.get("VmRSS")
            if kb is not None:
                self.samples += 1
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), kb)
                if kb > self.peak_detail.get("VmRSS", 0):
                    self.peak_detail = dict(st, phase=self.phase)
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join(2)


def create_batch(api: Client, file_id: str) -> dict:
    return api.json("POST", "/v1/batches", {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})


def follow(api: Client, batch_id: str, t_create: float, timeout: float, sampler: RssSampler | None = None,
           fast_poll_validating: bool = False) -> dict:
    """Polls the batch until a final status; returns the perf_counter time each status was first seen."""
    seen: dict[str, float] = {"created": t_create}
    last: dict = {}
    counts_done_at = None
    in_flight: list[float] = []  # batchd_upstream_in_flight, sampled at each poll while in_progress
    deadline = t_create + timeout
    while True:
        now = time.perf_counter()
        if now > deadline:
            try:
                api.json("POST", f"/v1/batches/{batch_id}/cancel")
            except Exception:
                pass
            raise TimeoutError(f"batch {batch_id} not done after {timeout:.0f}s (last status {last.get('status')}, "
                               f"counts {last.get('request_counts')})")
        b = api.json("GET", f"/v1/batches/{batch_id}")
        t = time.perf_counter()
        st = b["status"]
        if st not in seen:
            seen[st] = t
        if sampler is not None:
            sampler.phase = st
        if st == "in_progress":
            m = read_metrics(api)
            v = counter(m, "batchd_upstream_in_flight") if m else None
            if v is not None:
                in_flight.append(v)
        rc = b.get("request_counts") or {}
        if counts_done_at is None and rc.get("total") and rc.get("completed", 0) + rc.get("failed", 0) >= rc["total"]:
            counts_done_at = t
        last = b
        if st in FINAL:
            break
        time.sleep(0.01 if (fast_poll_validating and st == "validating") else 0.05)
    # A status skipped between two polls counts as first seen at the next one observed.
    order = ["validating", "in_progress", "finalizing", "completed"]
    for i, s in enumerate(order):
        if s not in seen:
            later = [seen[o] for o in order[i + 1:] if o in seen]
            if later:
                seen[s] = min(later)
    return {"seen": seen, "batch": last, "counts_done_at": counts_done_at, "in_flight": in_flight}


def run_batch(api: Client, mock: Client, path: Path, lines: int, timeout: float, pids: tuple[int, int],
              sampler: RssSampler | None = None) -> dict:
    """Uploads, creates, follows one batch; returns timings, counts, metrics deltas, mock stats and
    the CPU seconds that batchd and the mock (`pids`) spent from create to completed."""
    if sampler is not None:
        sampler.phase = "upload"
    file_id, up_s = upload(api.host + ":" + str(api.port), path)
    mock.request("POST", "/stats/reset")
    m0 = read_metrics(api)
    cpu0 = [cpu_seconds(p) for p in pids]
    t_create = time.perf_counter()
    b = create_batch(api, file_id)
    r = follow(api, b["id"], t_create, timeout, sampler, fast_poll_validating=True)
    cpu1 = [cpu_seconds(p) for p in pids]
    m1 = read_metrics(api)
    st = json.loads(mock.request("GET", "/stats")[1])
    b = r["batch"]
    if b["status"] != "completed":
        raise RuntimeError(f"batch ended {b['status']}: errors={json.dumps(b.get('errors'))[:500]}")
    rc = b["request_counts"]
    if rc["completed"] != lines:
        raise RuntimeError(f"batch completed {rc} but the file has {lines} lines")
    seen = r["seen"]
    run_s = max(seen["completed"] - seen["in_progress"], 1e-3)
    r.update(
        file_id=file_id, upload_s=up_s, run_s=run_s, throughput=lines / run_s,
        validate_s=seen["in_progress"] - seen["created"],
        engine_s=(r["counts_done_at"] or seen["completed"]) - seen["in_progress"],
        finalize_s=seen["completed"] - seen.get("finalizing", seen["completed"]),
        mock=st, metrics=(m0, m1), cpu_batchd=cpu1[0] - cpu0[0], cpu_mock=cpu1[1] - cpu0[1],
    )
    return r


def median(v: list[float]) -> float:
    v = sorted(v)
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2


def in_flight_text(r: dict, limit: int) -> str:
    v = r.get("in_flight") or []
    if not v:
        return "batchd in-flight gauge: n/a"
    return (f"batchd upstream in flight (sampled every poll, {len(v)} samples): mean {sum(v) / len(v):.0f}, "
            f"max {max(v):.0f} of {limit}")


def commits_figure(name: str, metrics) -> dict:
    m0, m1 = metrics
    fig = {"figure": f"store commits / 1000 results ({name})", "target": "measured ≤ 10", "ratio": None}
    if m0 is None or m1 is None:
        fig.update(measured="n/a (no /metrics)", baseline="", result="n/a")
        return fig
    c0, c1 = counter(m0, "batchd_store_commits_total"), counter(m1, "batchd_store_commits_total")
    r0, r1 = counter(m0, "batchd_results_committed_total"), counter(m1, "batchd_results_committed_total")
    if None in (c0, c1, r0, r1):
        fig.update(measured="n/a (counters missing in /metrics)", baseline="", result="n/a")
        return fig
    commits, results = c1 - c0, r1 - r0
    if results <= 0:
        fig.update(measured="n/a (0 results counted)", baseline=f"{commits:.0f} commits", result="n/a")
        return fig
    per_k = commits * 1000 / results
    fig.update(measured=f"{per_k:.2f}", baseline=f"{commits:.0f} commits / {results:.0f} results",
               value=per_k, result="PASS" if per_k <= 10 else "MISS")
    return fig


def find_loadgen() -> str | None:
    for tool in ("wrk", "oha"):
        if shutil.which(tool):
            return tool
    return None


def loadgen(tool: str, mock_addr: str, mock_pid: int, body: bytes, conns: int, seconds: int, work: Path) -> dict:
    url = f"http://{mock_addr}{CHAT}"
    if tool == "wrk":
        lua = work / "chat.lua"
        lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                       f"wrk.body = [==[{body.decode()}]==]\n")
        threads = max(1, min(os.cpu_count() or 2, conns))
        cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "-s", str(lua), url]
    else:
        cmd = ["oha", "--no-tui", "-z", f"{seconds}s", "-c", str(conns), "-m", "POST", "-T", "application/json",
               "-d", body.decode(), url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    mock_cpu0 = cpu_seconds(mock_pid)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _register(p)
    try:
        out, _ = p.communicate(timeout=seconds + 30)
    finally:
        stop_proc(p)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    mock_cpu = cpu_seconds(mock_pid) - mock_cpu0
    text = out.decode(errors="replace")
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not m:
        raise RuntimeError(f"cannot read {tool}'s output:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    rps = float(m.group(1))
    total = rps * seconds
    return {"rps": rps, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(0) if errors else "", "cmd": " ".join(cmd),
            "cpu_us_per_req_gen": gen_cpu * 1e6 / total if total else 0.0,
            "cpu_us_per_req_mock": mock_cpu * 1e6 / total if total else 0.0}


# ------------------------------------------------------------------------------ the figures


class Bench:
    def __init__(self, args):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.bin = str(Path(args.bin).resolve())
        self.work = Path(args.work).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.figures: list[dict] = []
        self.details: list[str] = []
        self.mock: Server | None = None
        self.mock_api: Client | None = None
        self.had_error = False
        self._shown_cmds: set[str] = set()
        self.sat_throughput: float | None = None
        self.databases: list[tuple[str, str]] = []

    # -- helpers

    def note(self, s: str) -> None:
        self.details.append(s)
        print(f"  · {s}", flush=True)

    def serve(self, name: str, concurrency: int, extra: list[str] | None = None) -> tuple[Server, Client]:
        data = self.work / f"data-{name}"
        assert self.mock is not None
        srv = Server(f"batchd-{name}", [self.bin, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data),
                                        "--upstream", f"http://{self.mock.addr}/v1", "--concurrency", str(concurrency)]
                     + (extra or []), cwd=self.work, log_dir=self.logs)
        return srv, Client(srv.addr)

    def set_latency(self, ms: int) -> None:
        assert self.mock_api is not None
        self.mock_api.json("POST", "/config", {"latency_ms": ms})

    def error(self, figure: str, target: str, e: BaseException) -> None:
        self.had_error = True
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        self.figures.append({"figure": figure, "measured": "ERROR", "baseline": "", "ratio": None, "target": target,
                             "result": "ERROR", "error": msg})
        print(f"  ! {figure}: {msg}", flush=True)
        traceback.print_exc(file=open(self.logs / "bench-errors.log", "a"))

    # -- figures

    def gen_note(self, tool: str, g: dict, when: str) -> None:
        cmd = g["cmd"].replace(str(self.work) + "/", "")
        shown = cmd in self._shown_cmds
        self._shown_cmds.add(cmd)
        self.note(f"{tool} {when}: {g['rps']:,.0f} req/s; CPU per request: {tool} {g['cpu_us_per_req_gen']:.0f} µs, "
                  f"mock {g['cpu_us_per_req_mock']:.0f} µs" + ("" if shown else f" ({cmd})"))
        if g["non2xx"] or g["socket_errors"]:
            self.note(f"{tool} reported non-2xx={g['non2xx']} {g['socket_errors']}")

    def batch_note(self, i: int, r: dict, n: int, c: int) -> None:
        self.note(f"batchd run {i}: {r['throughput']:,.0f} req/s (in_progress→completed {r['run_s']:.2f}s; lines durable "
                  f"after {r['engine_s']:.2f}s = {n / r['engine_s']:,.0f} req/s; finalizing {r['finalize_s']:.2f}s; "
                  f"validating {r['validate_s']:.2f}s); mock saw {r['mock']['requests']:,} requests; CPU per request "
                  f"(create→completed): batchd {r['cpu_batchd'] * 1e6 / n:.0f} µs, mock {r['cpu_mock'] * 1e6 / n:.0f} µs")
        self.note("  " + in_flight_text(r, c))

    def dispatch(self) -> None:
        s = self.sizes
        n, c, reps = s["dispatch_lines"], s["dispatch_concurrency"], s["reps"]
        print(f"\n[1/5] dispatch overhead: {n:,} lines × {reps}, mock answering instantly, concurrency {c}; "
              f"{s['dispatch_wrk_seconds']} s of wrk before, between and after the batches", flush=True)
        fig = "dispatch overhead (batchd ÷ wrk req/s)"
        target = "ratio ≥ 0.50"
        self.set_latency(0)
        path = self.work / "dispatch.jsonl"
        write_small(path, n)
        body = json.dumps(chat_body(0), separators=(",", ":")).encode()
        tool = find_loadgen()
        gen, runs = [], []

        def bare(when: str) -> None:
            if tool:
                gen.append(loadgen(tool, self.mock.addr, self.mock.pid, body, c, s["dispatch_wrk_seconds"], self.work))
                self.gen_note(tool, gen[-1], when)

        try:
            srv, api = self.serve("dispatch", c)
            try:
                bare("before batch 1")
                for i in range(reps):
                    runs.append(run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid)))
                    self.batch_note(i + 1, runs[-1], n, c)
                    bare(f"after batch {i + 1}")
            finally:
                srv.stop()
        except Exception as e:
            self.error(fig, target, e)
            return
        tput = median([r["throughput"] for r in runs])
        how = f"median of {reps}" if reps > 1 else "1 run"
        if gen:
            # Each batch against the mean of the wrk runs just before and just after it, so that a
            # change in the machine's background load hits both sides of each ratio alike.
            ratios = [r["throughput"] / ((gen[i]["rps"] + gen[i + 1]["rps"]) / 2) for i, r in enumerate(runs)]
            self.note("ratios per batch (÷ mean of the wrk runs around it): " + ", ".join(f"{x:.2f}" for x in ratios))
            ratio = median(ratios)
            base = median([g["rps"] for g in gen])
            # The same comparison in CPU time, which the machine's speed of the moment moves far
            # less than throughput: what the ratio would be if both kept the two cores equally busy.
            b_us, bm_us = median([r["cpu_batchd"] * 1e6 / n for r in runs]), median([r["cpu_mock"] * 1e6 / n for r in runs])
            g_us, gm_us = median([g["cpu_us_per_req_gen"] for g in gen]), median([g["cpu_us_per_req_mock"] for g in gen])
            self.note(f"CPU per request (medians): batchd {b_us:.0f} µs + mock {bm_us:.0f} µs against {tool} {g_us:.0f} µs + "
                      f"mock {gm_us:.0f} µs; CPU-cost ratio ({tool} + mock) ÷ (batchd + mock) = {(g_us + gm_us) / (b_us + bm_us):.2f}")
            self.figures.append({"figure": fig, "measured": f"{tput:,.0f} req/s ({how})",
                                 "baseline": f"{base:,.0f} req/s ({tool} -c {c}, median of {len(gen)})", "ratio": ratio,
                                 "ratio_note": "(median)" if reps > 1 else "",
                                 "target": target, "result": "PASS" if ratio >= 0.5 else "MISS"})
        else:
            self.figures.append({"figure": fig, "measured": f"{tput:,.0f} req/s ({how})",
                                 "baseline": "n/a (no wrk/oha)", "ratio": None, "target": target, "result": "n/a"})
        self.figures.append(commits_figure("dispatch runs", (runs[0]["metrics"][0], runs[-1]["metrics"][1])))

    def saturation(self) -> None:
        s = self.sizes
        n, c, lat = s["sat_lines"], s["sat_concurrency"], s["sat_latency_ms"]
        ideal = c / (lat / 1000)
        print(f"\n[2/5] saturation: {n:,} lines, mock latency {lat} ms, concurrency {c} (ideal {ideal:,.0f} req/s)", flush=True)
        fig = f"saturation (req/s ÷ C/L, C={c}, L={lat}ms)"
        target = "ratio ≥ 0.97"
        path = self.work / "saturation.jsonl"
        write_small(path, n)
        tool = find_loadgen()
        try:
            self.set_latency(lat)
            if tool:
                # Not the figure's baseline (that is C/L): what a bare client gets from the same mock.
                body = json.dumps(chat_body(0), separators=(",", ":")).encode()
                g = loadgen(tool, self.mock.addr, self.mock.pid, body, c, s["wrk_seconds"], self.work)
                self.gen_note(tool, g, "at the same C and L (reference only)")
                self.note(f"  {tool} reaches {g['rps'] / ideal:.3f} of C/L")
            srv, api = self.serve("saturation", c)
            try:
                r = run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid))
            finally:
                srv.stop()
                self.set_latency(0)
        except Exception as e:
            self.error(fig, target, e)
            return
        ratio = r["throughput"] / ideal
        self.batch_note(1, r, n, c)
        self.note(f"  ideal {n / ideal:.2f}s; mean cycle per slot {c * r['engine_s'] / n * 1000:.1f} ms for L = {lat} ms")
        self.figures.append({"figure": fig, "measured": f"{r['throughput']:,.0f} req/s", "baseline": f"{ideal:,.0f} req/s (C/L)",
                             "ratio": ratio, "target": target, "result": "PASS" if ratio >= 0.97 else "MISS"})
        self.figures.append(commits_figure("saturation run", r["metrics"]))
        self.sat_throughput = r["throughput"]

    def big(self) -> None:
        s = self.sizes
        n, size, c = s["big_lines"], s["big_bytes"], s["big_concurrency"]
        print(f"\n[3/5] memory + validation: {n:,} lines, {size / MB:.0f} MB, mock answering instantly, concurrency {c}; "
              f"then the same batch again on the same server", flush=True)
        tag = f"{n // 1000}k lines, {size // MB} MB"
        fig_rss = f"peak RSS of batchd serve ({tag})"
        fig_rss2 = "peak RSS, same server, 2nd batch"
        fig_val = f"validation, server path (create→in_progress, {size // MB} MB)"
        path = self.work / "big.jsonl"
        t0 = time.perf_counter()
        write_big(path, n, size)
        self.note(f"generated {path.name}: {n:,} lines, {size:,} bytes in {time.perf_counter() - t0:.1f}s")
        base_mbs = self.wc_baseline(path, size)
        self.cli_validate(path, size, base_mbs)
        runs, hwm, samplers = [], [], []
        try:
            srv, api = self.serve("big", c)
            idle = proc_status(srv.pid).get("VmRSS", 0)
            try:
                for i in range(2):
                    sampler = RssSampler(srv.pid)
                    samplers.append(sampler)
                    sampler.start()
                    try:
                        runs.append(run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid), sampler))
                    finally:
                        sampler.stop()
                    hwm.append(proc_status(srv.pid).get("VmHWM", 0))
                    self.rss_notes(i + 1, runs[-1], sampler, hwm[-1], n, size)
            finally:
                srv.stop()
        except Exception as e:
            if not runs:
                self.error(fig_rss, "measured ≤ 64 MB", e)
                self.error(fig_val, "measured ≥ 300 MB/s", e)
                return
            self.error(fig_rss2, "measured ≤ 64 MB", e)
        r = runs[0]
        self.note(f"RSS idle before the first upload: {idle / 1024:.1f} MB")
        for i, (h, smp) in enumerate(zip(hwm, samplers)):
            label = fig_rss if i == 0 else fig_rss2
            peak_mb = h / 1024
            run_peak = max((v for k, v in smp.peaks.items() if k not in ("before upload", "upload")), default=0) / 1024
            up_peak = smp.peaks.get("upload", 0) / 1024
            self.figures.append({"figure": label, "measured": f"{peak_mb:.1f} MB (VmHWM)",
                                 "baseline": f"{idle / 1024:.1f} MB idle; sampled: upload {up_peak:.1f}, run {run_peak:.1f}",
                                 "ratio": peak_mb / (idle / 1024) if idle else None, "ratio_note": "× idle",
                                 "target": "measured ≤ 64 MB", "result": "PASS" if peak_mb <= 64 else "MISS"})
        mbs = size / MB / r["validate_s"]
        self.figures.append({"figure": fig_val, "measured": f"{mbs:,.0f} MB/s", "baseline": f"{base_mbs:,.0f} MB/s (wc -l)",
                             "ratio": mbs / base_mbs, "target": "measured ≥ 300 MB/s", "result": "PASS" if mbs >= 300 else "MISS"})
        self.figures.append(commits_figure(f"{n // 1000}k run", r["metrics"]))

    def rss_notes(self, i: int | str, r: dict, sampler: RssSampler, hwm: int, n: int, size: int) -> None:
        phases = ", ".join(f"{k} {v / 1024:.1f}" for k, v in sampler.peaks.items())
        self.note(f"batch {i}: VmHWM {hwm / 1024:.1f} MB; sampled peaks by phase (MB, every 50 ms, {sampler.samples} "
                  f"samples): {phases}")
        d = sampler.peak_detail
        if d:
            self.note(f"  highest sample ({d.get('phase')}): VmRSS {d.get('VmRSS', 0) / 1024:.1f} MB = anonymous "
                      f"{d.get('RssAnon', 0) / 1024:.1f} + file-backed {d.get('RssFile', 0) / 1024:.1f} + shared "
                      f"{d.get('RssShmem', 0) / 1024:.1f} MB")
        self.note(f"  upload {size / MB / r['upload_s']:,.0f} MB/s ({r['upload_s']:.2f}s); validation {r['validate_s'] * 1000:.0f} ms "
                  f"(POST /v1/batches → in_progress, polled every 10 ms, store writes of the units included) = "
                  f"{size / MB / r['validate_s']:,.0f} MB/s; run {r['throughput']:,.0f} req/s (in_progress→completed "
                  f"{r['run_s']:.2f}s, finalizing {r['finalize_s']:.2f}s); CPU per request: batchd "
                  f"{r['cpu_batchd'] * 1e6 / n:.0f} µs, mock {r['cpu_mock'] * 1e6 / n:.0f} µs")

    def flat(self) -> None:
        s = self.sizes
        (n0, n1), per, c = s["flat_lines"], s["flat_line_bytes"], s["big_concurrency"]
        print(f"\n[4/5] flat memory: {n0:,} and {n1:,} chat lines of {per} bytes, each on a fresh server, mock answering "
              f"instantly, concurrency {c}; then kill -9 mid-batch at {n1:,} lines and restart", flush=True)
        k0, k1 = f"{n0 // 1000}k", f"{n1 // 1000}k"
        fig_rss, fig_tput = f"peak RSS {k1} ÷ {k0} lines", f"throughput {k1} ÷ {k0} lines"
        fig_fin, fig_restart = f"finalization, {k1} lines", f"restart after kill -9 → next request ({k1})"
        # Limits raised explicitly, so that builds with smaller defaults can be compared too.
        conf = self.work / "flat.toml"
        conf.write_text(f"[limits]\nmax_lines = {n1}\nmax_file_bytes = {n1 * per}\nmax_upload_bytes = {n1 * per}\n")
        extra = ["--config", str(conf)]
        runs: dict[int, dict] = {}
        try:
            paths = {}
            for n in (n0, n1):
                paths[n] = self.work / f"flat-{n}.jsonl"
                write_big(paths[n], n, n * per)
            for n in (n0, n1):
                runs[n] = self.flat_run(f"flat-{n}", paths[n], n, c, extra)
        except Exception as e:
            for fig, target in ((fig_rss, "≤ 64 MB, ratio ≤ 1.10"), (fig_tput, "ratio ≥ 0.90"), (fig_fin, "ratio ≤ 0.25")):
                self.error(fig, target, e)
            return
        a, b = runs[n0], runs[n1]
        ratio = b["hwm"] / a["hwm"]
        self.figures.append({"figure": fig_rss, "measured": f"{b['hwm'] / 1024:.1f} MB (VmHWM)",
                             "baseline": f"{a['hwm'] / 1024:.1f} MB", "ratio": ratio, "target": "≤ 64 MB, ratio ≤ 1.10",
                             "result": "PASS" if b["hwm"] <= 64 * 1024 and ratio <= 1.10 else "MISS"})
        t = b["throughput"] / a["throughput"]
        self.figures.append({"figure": fig_tput, "measured": f"{b['throughput']:,.0f} req/s",
                             "baseline": f"{a['throughput']:,.0f} req/s", "ratio": t, "target": "ratio ≥ 0.90",
                             "result": "PASS" if t >= 0.90 else "MISS"})
        f = b["finalize_s"] / b["engine_s"]
        self.figures.append({"figure": fig_fin, "measured": f"{b['finalize_s']:.2f} s",
                             "baseline": f"{b['engine_s']:.1f} s dispatch", "ratio": f, "target": "ratio ≤ 0.25",
                             "result": "PASS" if f <= 0.25 else "MISS"})
        try:
            secs = self.restart_to_first_request(paths[n1], n1, c, extra)
        except Exception as e:
            self.error(fig_restart, "measured ≤ 2 s", e)
            return
        self.figures.append({"figure": fig_restart, "measured": f"{secs:.2f} s", "baseline": "", "ratio": None,
                             "target": "measured ≤ 2 s", "result": "PASS" if secs <= 2 else "MISS"})

    def timeout_for(self, lines: int) -> float:
        return self.sizes["timeout_s"] * max(1.0, lines / 100_000)

    def flat_run(self, name: str, path: Path, n: int, c: int, extra: list[str]) -> dict:
        srv, api = self.serve(name, c, extra)
        sampler = RssSampler(srv.pid)
        sampler.start()
        try:
            r = run_batch(api, self.mock_api, path, n, self.timeout_for(n), (srv.pid, self.mock.pid), sampler)
        finally:
            sampler.stop()
            r_hwm = proc_status(srv.pid).get("VmHWM", 0)
            srv.stop()
        r["hwm"] = r_hwm
        self.rss_notes(f"of {n:,} lines", r, sampler, r_hwm, n, path.stat().st_size)
        self.note(f"  lines durable after {r['engine_s']:.2f}s, finalizing {r['finalize_s']:.2f}s")
        return r

    def restart_to_first_request(self, path: Path, n: int, c: int, extra: list[str]) -> float:
        """Kills `batchd serve` with SIGKILL while a batch of `n` lines is 40 % done, starts it again on the
        same data directory, and returns the seconds from that start to the mock's next request."""
        srv, api = self.serve("flat-kill", c, extra)
        try:
            file_id, _ = upload(srv.addr, path)
            b = create_batch(api, file_id)
            deadline = time.perf_counter() + self.timeout_for(n)
            while True:
                rc = api.json("GET", f"/v1/batches/{b['id']}").get("request_counts") or {}
                done = rc.get("completed", 0) + rc.get("failed", 0)
                if done >= 0.4 * n:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"the batch did not reach 40 % (counts {rc})")
                time.sleep(0.05)
            srv.proc.kill()
            srv.proc.wait(10)
        finally:
            srv.stop()
        stats = Client(self.mock.addr)
        count = lambda: json.loads(stats.request("GET", "/stats")[1])["requests"]
        # Calls the dead process had sent may still be counted by the mock: wait for the count to settle.
        before, settled = count(), time.perf_counter()
        while time.perf_counter() - settled < 0.3:
            time.sleep(0.05)
            if (now := count()) != before:
                before, settled = now, time.perf_counter()
        seen: list[float] = []

        def watch():
            while not seen and time.perf_counter() < t0 + 60:
                if count() > before:
                    seen.append(time.perf_counter())
                time.sleep(0.005)

        t0 = time.perf_counter()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        srv, _ = self.serve("flat-kill", c, extra)
        try:
            watcher.join(65)
        finally:
            srv.stop()
        if not seen:
            raise RuntimeError("no request reached the mock within 60 s of the restart")
        secs = seen[0] - t0
        self.note(f"killed with {done:,} of {n:,} lines durable; restarted: next request {secs:.2f}s after the start "
                  f"(process start, store open, lease release and the first unit's resume included)")
        return secs

    # -- scale-out: PostgreSQL + S3

    def fresh_backends(self, pg: str, s3: str) -> tuple[str, str]:
        """A fresh database (psql) and bucket (an unsigned PUT, which the moto emulator accepts);
        returns the node's --database and --blob URLs."""
        name = f"batchd_bench_{uuid.uuid4().hex[:12]}"
        subprocess.run(["psql", pg, "-q", "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
        self.databases.append((pg, name))
        base, _, _db = pg.partition("?")[0].rpartition("/")
        bucket = name.replace("_", "-")
        host = s3.split("://", 1)[1].rstrip("/")
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("PUT", f"/{bucket}")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"creating bucket {bucket} on {s3}: HTTP {resp.status}")
        return f"{base}/{name}", f"s3://{bucket}/bench"

    def serve_on(self, name: str, concurrency: int, database: str, blob: str, s3: str) -> tuple[Server, Client]:
        assert self.mock is not None
        env = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
               "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
               "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")}
        srv = Server(f"batchd-{name}", [self.bin, "serve", "--listen", "127.0.0.1:0", "--database", database, "--blob", blob,
                                        "--upstream", f"http://{self.mock.addr}/v1", "--concurrency", str(concurrency)],
                     cwd=self.work, log_dir=self.logs, env=env)
        return srv, Client(srv.addr)

    def scale(self) -> None:
        pg, s3 = os.environ.get("BATCHD_BENCH_POSTGRES_URL"), os.environ.get("BATCHD_BENCH_S3_URL")
        print("\n[scale] one node on PostgreSQL + S3 against the embedded default; two nodes against one; "
              "store transactions per 1,000 results on PostgreSQL", flush=True)
        if not pg or not s3 or not shutil.which("psql"):
            self.note("skipped: needs BATCHD_BENCH_POSTGRES_URL, BATCHD_BENCH_S3_URL and psql (run.sh sets them when "
                      "PostgreSQL answers on 127.0.0.1:5432 and scripts/s3-server.sh can start moto)")
            self.figures.append({"figure": "scale-out figures", "measured": "n/a (no PostgreSQL or S3)", "baseline": "",
                                 "ratio": None, "target": "", "result": "n/a"})
            return
        s = self.sizes
        n, c, lat = s["sat_lines"], s["sat_concurrency"], s["sat_latency_ms"]
        path = self.work / "saturation.jsonl"
        write_small(path, n)
        fig, target = f"saturation, PostgreSQL + S3 ÷ embedded (C={c}, L={lat}ms)", "ratio ≥ 0.90"
        try:
            if self.sat_throughput is None:
                self.set_latency(lat)
                srv, api = self.serve("saturation-embedded", c)
                try:
                    self.sat_throughput = run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid))["throughput"]
                finally:
                    srv.stop()
            database, blob = self.fresh_backends(pg, s3)
            self.set_latency(lat)
            srv, api = self.serve_on("saturation-pg", c, database, blob, s3)
            try:
                r = run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid))
            finally:
                srv.stop()
                self.set_latency(0)
        except Exception as e:
            self.error(fig, target, e)
            return
        self.batch_note(1, r, n, c)
        ratio = r["throughput"] / self.sat_throughput
        self.figures.append({"figure": fig, "measured": f"{r['throughput']:,.0f} req/s",
                             "baseline": f"{self.sat_throughput:,.0f} req/s (embedded)", "ratio": ratio, "target": target,
                             "result": "PASS" if ratio >= 0.9 else "MISS"})
        self.figures.append(commits_figure("PostgreSQL, saturation run", r["metrics"]))
        self.two_nodes(pg, s3)
        self.scale_rss(pg, s3)

    def scale_rss(self, pg: str, s3: str) -> None:
        s = self.sizes
        n, size, c = s["big_lines"], s["big_bytes"], s["big_concurrency"]
        fig = f"peak RSS, PostgreSQL + S3 ({n // 1000}k lines, {size // MB} MB)"
        path = self.work / "big.jsonl"
        if not path.exists() or path.stat().st_size != size:
            write_big(path, n, size)
        try:
            database, blob = self.fresh_backends(pg, s3)
            self.set_latency(0)
            srv, api = self.serve_on("big-pg", c, database, blob, s3)
            sampler = RssSampler(srv.pid)
            try:
                idle = proc_status(srv.pid).get("VmRSS", 0)
                sampler.start()
                try:
                    r = run_batch(api, self.mock_api, path, n, s["timeout_s"], (srv.pid, self.mock.pid), sampler)
                finally:
                    sampler.stop()
                hwm = proc_status(srv.pid).get("VmHWM", 0)
            finally:
                srv.stop()
        except Exception as e:
            self.error(fig, "measured ≤ 64 MB", e)
            return
        self.rss_notes(1, r, sampler, hwm, n, size)
        peak_mb = hwm / 1024
        self.figures.append({"figure": fig, "measured": f"{peak_mb:.1f} MB (VmHWM)", "baseline": f"{idle / 1024:.1f} MB idle",
                             "ratio": peak_mb / (idle / 1024) if idle else None, "ratio_note": "× idle",
                             "target": "measured ≤ 64 MB", "result": "PASS" if peak_mb <= 64 else "MISS"})
        self.figures.append(commits_figure(f"PostgreSQL, {n // 1000}k run", r["metrics"]))

    def two_nodes(self, pg: str, s3: str) -> None:
        s = self.sizes
        n, c = s["dispatch_lines"], s["dispatch_concurrency"]
        fig, target = f"two nodes ÷ one (PostgreSQL + S3, instant upstream, {n:,} lines)", "report"
        path = self.work / "dispatch.jsonl"
        write_small(path, n)
        try:
            database, blob = self.fresh_backends(pg, s3)
            self.set_latency(0)
            a, api_a = self.serve_on("node-a", c, database, blob, s3)
            try:
                one = run_batch(api_a, self.mock_api, path, n, s["timeout_s"], (a.pid, self.mock.pid))
                b, _ = self.serve_on("node-b", c, database, blob, s3)
                try:
                    time.sleep(2)  # a heartbeat or two: both nodes are live
                    two = run_batch(api_a, self.mock_api, path, n, s["timeout_s"], (a.pid, self.mock.pid))
                finally:
                    b.stop()
            finally:
                a.stop()
        except Exception as e:
            self.error(fig, target, e)
            return
        self.note(f"one node: {one['throughput']:,.0f} req/s; two nodes: {two['throughput']:,.0f} req/s "
                  f"(both on this machine's {os.cpu_count()} cores, with PostgreSQL, moto and the mock)")
        self.figures.append({"figure": fig, "measured": f"{two['throughput']:,.0f} req/s", "baseline": f"{one['throughput']:,.0f} req/s (one node)",
                             "ratio": two["throughput"] / one["throughput"], "target": target, "result": "report"})
        self.figures.append(commits_figure("PostgreSQL, two nodes", two["metrics"]))

    def cluster(self) -> None:
        import cluster as cluster_step  # bench/cluster.py, beside this file
        cluster_step.run(self, sys.modules[__name__])

    def prefix(self) -> None:
        import prefix as prefix_step  # bench/prefix.py, beside this file
        prefix_step.run(self, sys.modules[__name__])

    def drop_databases(self) -> None:
        for pg, name in self.databases:
            subprocess.run(["psql", pg, "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True)

    def wc_baseline(self, path: Path, size: int) -> float:
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(["wc", "-l", str(path)], check=True, stdout=subprocess.DEVNULL)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        mbs = size / MB / best
        self.note(f"baseline `wc -l` on the same file (page cache warm, best of 3): {mbs:,.0f} MB/s")
        return mbs

    def cli_validate(self, path: Path, size: int, base_mbs: float) -> None:
        fig = f"validation, `batchd validate` ({size // MB} MB)"
        target = "measured ≥ 300 MB/s"
        helptext = subprocess.run([self.bin, "--help"], capture_output=True, text=True).stdout
        if not re.search(r"^\s+validate\s", helptext, re.M):
            self.note("`batchd validate` does not exist in this build: only the server path is measured")
            return
        best = None
        out = ""
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                p = subprocess.run([self.bin, "validate", str(path)], capture_output=True, text=True, cwd=self.work,
                                   env=child_env(), timeout=300)
                dt = time.perf_counter() - t0
                if p.returncode != 0:
                    raise RuntimeError(f"batchd validate exited {p.returncode}: {(p.stdout + p.stderr)[-300:]}")
                out = p.stdout
                best = dt if best is None else min(best, dt)
        except Exception as e:
            self.error(fig, target, e)
            return
        mbs = size / MB / best
        self.note(f"`batchd validate {path.name}` (best of 2, process start included): {best * 1000:.0f} ms; "
                  f"it said: {out.strip().splitlines()[0] if out.strip() else ''}")
        self.figures.append({"figure": fig, "measured": f"{mbs:,.0f} MB/s", "baseline": f"{base_mbs:,.0f} MB/s (wc -l)",
                             "ratio": mbs / base_mbs, "target": target, "result": "PASS" if mbs >= 300 else "MISS"})

    # -- upstream citizenship (issue #11)

    def mock_set(self, **kv) -> None:
        assert self.mock_api is not None
        self.mock_api.json("POST", "/config", kv)

    def mock_reset(self) -> None:
        self.mock_set(latency_ms=0, capacity=0, slots=0, rpm=0, tpm=0, limit_rps=0, limit_start=1.0,
                      quota_exhausted=False, extra_waiting=0, rate_429=0, retry_after_s=1.0, limit_period_s=60,
                      refusal_status=429)

    def serve_config(self, name: str, toml: str) -> tuple[Server, Client]:
        cfg = self.work / f"{name}.toml"
        cfg.write_text(toml)
        srv = Server(f"batchd-{name}", [self.bin, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(self.work / f"data-{name}"),
                                        "--config", str(cfg)], cwd=self.work, log_dir=self.logs)
        return srv, Client(srv.addr)

    def sampled_batch(self, api: Client, path: Path, timeout: float) -> tuple[dict, list[tuple[float, int, int, int]], list]:
        """Uploads and runs a batch, reading the mock's /stats every 100 ms: returns the final batch,
        the (time, requests, 200s, refusals) samples (429s and 503s) and progress.upstreams as last seen running."""
        assert self.mock_api is not None
        file_id, _ = upload(api.host + ":" + str(api.port), path)
        self.mock_api.request("POST", "/stats/reset")
        b = create_batch(api, file_id)
        samples, upstreams = [], []
        deadline = time.perf_counter() + timeout
        while True:
            st = json.loads(self.mock_api.request("GET", "/stats?window_ms=1")[1])
            by = st.get("by_status", {})
            samples.append((time.perf_counter(), st["requests"], by.get("200", 0), by.get("429", 0) + by.get("503", 0)))
            b = api.json("GET", f"/v1/batches/{b['id']}")
            if b["status"] == "in_progress":
                upstreams = (b.get("progress") or {}).get("upstreams") or upstreams
            if b["status"] in FINAL:
                return b, samples, upstreams
            if time.perf_counter() > deadline:
                raise TimeoutError(f"batch {b['id']} not done after {timeout:.0f}s ({b.get('request_counts')})")
            time.sleep(0.1)

    @staticmethod
    def steady(samples: list, n: int) -> tuple[float, float]:
        """(429 share, 200s per second) between the first and the last tenth of the answers."""
        a = next(x for x in samples if x[2] >= n // 10)
        b = next(x for x in reversed(samples) if x[2] <= n * 9 // 10)
        calls = max(b[1] - a[1], 1)
        return (b[3] - a[3]) / calls, (b[2] - a[2]) / max(b[0] - a[0], 1e-3)

    def citizen_figures(self, case: str, n: int, ideal: float, b: dict, samples: list, extra: str = "",
                        base_label: str = "") -> None:
        share, ok_rate = self.steady(samples, n)
        rc = b["request_counts"]
        last = samples[-1]
        self.note(f"{case}: {rc['completed']} of {n} lines succeeded, {rc['failed']} failed; the mock answered {last[1]:,} calls, "
                  f"{last[3]:,} of them 429 in all; steady state {ok_rate:,.0f} req/s, {share:.2%} 429{extra}")
        self.figures.append({"figure": f"429 share, {case}", "measured": f"{share:.2%}", "baseline": f"{last[3]:,} 429s in all",
                             "ratio": None, "target": "measured ≤ 5 %",
                             "result": "PASS" if share <= 0.05 and rc["failed"] == 0 else "MISS"})
        ratio = ok_rate / ideal
        self.figures.append({"figure": f"throughput ÷ upstream limit, {case}", "measured": f"{ok_rate:,.0f} req/s",
                             "baseline": base_label or f"{ideal:,.0f} req/s", "ratio": ratio, "target": "ratio ≥ 0.85",
                             "result": "PASS" if ratio >= 0.85 else "MISS"})

    def limits(self) -> None:
        s = self.sizes
        print("\n[limits] upstream citizenship, no limits configured: a 16-slot cap answering 429 (20 ms), "
              "1,200 rpm with OpenAI's headers, standby on a 16-slot server shared with 4 online clients; "
              "issue #20's shapes: stray 429s, a per-second limiter, 503 refusals at a cap and at a rate, "
              "first contact, a fast single-threaded upstream", flush=True)
        cases = [
            ("429 share, capacity 16 @ 20 ms", "measured ≤ 5 %", lambda: self.limits_capacity(s["cap_lines"])),
            ("429 share, 1,200 rpm + headers", "measured ≤ 5 %", lambda: self.limits_rpm(s["rpm_lines"])),
            ("standby: online median ÷ unloaded", "measured ≤ 2", lambda: self.limits_standby(s["standby_seconds"])),
            ("stray 429s: throughput ÷ clean", "ratio ≥ 0.70", lambda: self.limits_stray(s["stray_lines"])),
            ("per-second limiter: refused share", "measured ≤ 10 %", lambda: self.limits_per_second(s["per_second_lines"])),
            ("503 at capacity 16: lines failed", "0", lambda: self.limits_503_capacity(s["cap_lines"] // 2)),
            ("503 from nginx limit_req 20 r/s: lines failed", "0", lambda: self.limits_503_rate(s["nginx_lines"])),
            ("fast single-threaded upstream: dispatch ÷ wrk", "ratio ≥ 0.50", lambda: self.limits_fast(s["fast_lines"])),
        ]
        for fig, target, run in cases:
            try:
                run()
            except Exception as e:
                self.error(fig, target, e)
            finally:
                self.mock_reset()

    def limits_capacity(self, n: int) -> None:
        path = self.work / "capacity.jsonl"
        write_small(path, n)
        self.mock_reset()
        self.mock_set(latency_ms=20)
        srv, api = self.serve("told-16", 16)
        try:
            b, samples, _ = self.sampled_batch(api, path, self.sizes["timeout_s"])
            _, told = self.steady(samples, n)
            self.note(f"reference: batchd told the limit (--concurrency 16), no cap: {told:,.0f} req/s "
                      f"({told / 800:.2f} of the ideal 800)")
        finally:
            srv.stop()
        self.mock_set(capacity=16)
        srv, api = self.serve("capacity", 64)
        try:
            b, samples, _ = self.sampled_batch(api, path, self.sizes["timeout_s"])
            m = read_metrics(api) or {}
        finally:
            srv.stop()
        window = counter(m, "batchd_upstream_window")
        # What the upstream can serve on this machine now: 800 req/s in theory, what a client
        # told the limit got a moment ago in practice (the two cores are shared).
        self.citizen_figures("capacity 16 @ 20 ms", n, min(told, 800.0), b, samples,
                             (f"; window at the end {window:.1f}" if window is not None else "")
                             + f"; {self.steady(samples, n)[1] / 800:.2f} of the ideal 800 req/s",
                             base_label=f"{told:,.0f} req/s (told the limit; ideal 800)")

    def limits_rpm(self, n: int) -> None:
        path = self.work / "rpm.jsonl"
        write_small(path, n)
        self.mock_reset()
        self.mock_set(latency_ms=20, rpm=1200, limit_start=0.005)
        srv, api = self.serve("rpm", 64)
        try:
            b, samples, upstreams = self.sampled_batch(api, path, self.sizes["timeout_s"])
        finally:
            srv.stop()
        learned = next((u.get("learned_rpm") for u in upstreams), None)
        self.citizen_figures("1,200 rpm + headers", n, 20.0, b, samples,
                             f"; learned {learned:,.0f} rpm" if learned is not None else "")

    def serve_upstream(self, name: str, concurrency: int, extra: str = "", addr: str | None = None) -> tuple[Server, Client]:
        """batchd serve with one upstream (the shared mock unless `addr`), max_concurrency `concurrency`."""
        assert self.mock is not None
        toml = (f'[[upstreams]]\nname = "up"\nbase_url = "http://{addr or self.mock.addr}/v1"\nmodels = ["*"]\n'
                f'max_concurrency = {concurrency}\n{extra}')
        return self.serve_config(name, toml)

    def first_second_refusals(self, samples: list) -> int:
        """Refusals the mock counted in the first second after the batch's first call."""
        t0 = next((x[0] for x in samples if x[1] > 0), None)
        if t0 is None:
            return 0
        at = [x for x in samples if x[0] <= t0 + 1.0]
        return at[-1][3] if at else 0

    def fail_figure(self, fig: str, b: dict, detail: str) -> None:
        failed = b["request_counts"]["failed"]
        self.figures.append({"figure": fig, "measured": f"{failed} of {b['request_counts']['total']}", "baseline": detail,
                             "ratio": None, "target": "0", "result": "PASS" if failed == 0 else "MISS"})

    def limits_stray(self, n: int) -> None:
        # Issue #20 (1): 5 % of answers 429 at random with retry-after-ms 500, whatever the load.
        path = self.work / "stray.jsonl"
        write_small(path, n)
        runs = []
        for share in (0.0, 0.05):
            self.mock_reset()
            self.mock_set(latency_ms=50, rate_429=share, retry_after_s=0.5)
            srv, api = self.serve_upstream(f"stray-{share}", 64)
            try:
                runs.append(run_batch(api, self.mock_api, path, n, self.sizes["timeout_s"], (srv.pid, self.mock.pid)))
            finally:
                srv.stop()
        clean, stray = runs
        ratio = stray["throughput"] / clean["throughput"]
        calls, limited = stray["mock"]["requests"], stray["mock"].get("by_status", {}).get("429", 0)
        self.note(f"stray 429s (5 %, retry-after-ms 500, 64 × 50 ms): {stray['throughput']:,.0f} lines/s against "
                  f"{clean['throughput']:,.0f} clean; {limited:,} 429s of {calls:,} calls ({limited / max(calls, 1):.1%}); no line failed")
        self.figures.append({"figure": "stray 429s (5 %, retry-after 500 ms): throughput ÷ clean", "measured": f"{stray['throughput']:,.0f} lines/s",
                             "baseline": f"{clean['throughput']:,.0f} lines/s clean", "ratio": ratio, "target": "ratio ≥ 0.70",
                             "result": "PASS" if ratio >= 0.7 else "MISS"})

    def limits_per_second(self, n: int) -> None:
        # Issue #20 (2): 1,200 rpm held as a bucket of 20 refilled at 20/s, headers on every answer.
        path = self.work / "per-second.jsonl"
        write_small(path, n)
        self.mock_reset()
        self.mock_set(latency_ms=20, rpm=1200, limit_period_s=1)
        srv, api = self.serve_upstream("per-second", 64)
        try:
            b, samples, upstreams = self.sampled_batch(api, path, self.sizes["timeout_s"])
        finally:
            srv.stop()
        last = samples[-1]
        share = last[3] / max(last[1], 1)
        _, ok_rate = self.steady(samples, n)
        learned = next((u.get("learned_rpm") for u in upstreams), None)
        self.note(f"per-second limiter (1,200 rpm as 20 a second): {last[3]:,} of {last[1]:,} calls refused ({share:.1%}), "
                  f"{ok_rate:.1f} req/s steady ({ok_rate / 20:.2f} of the limit), {b['request_counts']['failed']} lines failed"
                  + (f", learned {learned:,.0f} rpm" if learned is not None else ""))
        self.figures.append({"figure": "per-second limiter (1,200 rpm as 20/s): refused share of calls", "measured": f"{share:.1%}",
                             "baseline": f"{last[3]:,} of {last[1]:,} calls", "ratio": None, "target": "measured ≤ 10 %",
                             "result": "PASS" if share <= 0.10 and b["request_counts"]["failed"] == 0 else "MISS"})
        self.figures.append({"figure": "per-second limiter: throughput ÷ limit", "measured": f"{ok_rate:.1f} req/s",
                             "baseline": "20 req/s", "ratio": ok_rate / 20, "target": "ratio ≥ 0.85",
                             "result": "PASS" if ok_rate / 20 >= 0.85 else "MISS"})

    def limits_503_capacity(self, n: int) -> None:
        # Issue #20 (3): nginx's limit_conn answers 503; with max_attempts = 2 no line may fail.
        path = self.work / "cap503.jsonl"
        write_small(path, n)
        self.mock_reset()
        self.mock_set(latency_ms=20, capacity=16, refusal_status=503)
        srv, api = self.serve_upstream("cap503", 64, "max_attempts = 2\n")
        try:
            b, samples, _ = self.sampled_batch(api, path, self.sizes["timeout_s"])
        finally:
            srv.stop()
        share, ok_rate = self.steady(samples, n)
        first = self.first_second_refusals(samples)
        self.note(f"503 at capacity 16 (max_attempts 2): {b['request_counts']['failed']} of {n} lines failed; steady "
                  f"{ok_rate:,.0f} req/s ({ok_rate / 800:.2f} of 800), {share:.2%} 503; {first} refusals in the first second")
        self.fail_figure("503 at capacity 16, max_attempts 2: lines failed", b, f"{share:.2%} 503 steady, {ok_rate / 800:.2f} of 800 req/s")
        self.figures.append({"figure": "first contact, capacity 16 (503): refusals in the first second", "measured": str(first),
                             "baseline": "123 429s / 88 503s against nginx before", "ratio": None, "target": "a handful (≤ 10)",
                             "result": "PASS" if first <= 10 else "MISS"})

    def limits_503_rate(self, n: int) -> None:
        # Issue #20 (3, 4): nginx's limit_req of 20 r/s answering 503 (its default), max_attempts 2.
        path = self.work / "rate503.jsonl"
        write_small(path, n)
        self.mock_reset()
        self.mock_set(latency_ms=20, limit_rps=20, refusal_status=503)
        srv, api = self.serve_upstream("rate503", 16, "max_attempts = 2\n")
        try:
            b, samples, upstreams = self.sampled_batch(api, path, self.sizes["timeout_s"])
        finally:
            srv.stop()
        share, ok_rate = self.steady(samples, n)
        first = self.first_second_refusals(samples)
        self.note(f"nginx limit_req 20 r/s answering 503 (max_attempts 2): {b['request_counts']['failed']} of {n} lines failed; "
                  f"steady {ok_rate:.1f} req/s ({ok_rate / 20:.2f} of the limit), {share:.2%} 503; {first} refusals in the first second")
        self.fail_figure("503 from nginx limit_req 20 r/s, max_attempts 2: lines failed", b, f"{share:.2%} 503 steady, {ok_rate / 20:.2f} of the limit")
        self.figures.append({"figure": "first contact, nginx limit_req 20 r/s (503): refusals in the first second", "measured": str(first),
                             "baseline": "88 503s before", "ratio": None, "target": "a handful (≤ 15)",
                             "result": "PASS" if first <= 15 else "MISS"})

    def limits_fast(self, n: int) -> None:
        # Issue #20 (5): an instant mock on one thread; batchd's dispatch against wrk -c64 on it.
        tool = find_loadgen()
        fast = Server("mock-fast", [self.bin, "mock-upstream", "--listen", "127.0.0.1:0", "--seed", "1", "--threads", "1"],
                      cwd=self.work, log_dir=self.logs)
        try:
            path = self.work / "fast.jsonl"
            write_small(path, n)
            body = json.dumps(chat_body(0), separators=(",", ":")).encode()
            fast_api = Client(fast.addr)
            gen = []
            if tool:
                gen.append(loadgen(tool, fast.addr, fast.pid, body, 64, self.sizes["dispatch_wrk_seconds"], self.work))
                self.gen_note(tool, gen[-1], "on the single-threaded mock")
            srv, api = self.serve_upstream("fast", 64, addr=fast.addr)
            try:
                r = run_batch(api, fast_api, path, n, self.sizes["timeout_s"], (srv.pid, fast.pid))
                m = read_metrics(api) or {}
            finally:
                srv.stop()
            if tool:
                gen.append(loadgen(tool, fast.addr, fast.pid, body, 64, self.sizes["dispatch_wrk_seconds"], self.work))
                self.gen_note(tool, gen[-1], "on the single-threaded mock, after")
            peak = json.loads(fast_api.request("GET", "/stats")[1]).get("peak_in_flight")
        finally:
            fast.stop()
        window = counter(m, "batchd_upstream_window")
        self.note(f"fast single-threaded mock: batchd {r['throughput']:,.0f} req/s, peak in flight at the mock {peak}, "
                  f"window at the end {window}")
        if not gen:
            self.figures.append({"figure": "fast single-threaded upstream: dispatch ÷ wrk -c64", "measured": f"{r['throughput']:,.0f} req/s",
                                 "baseline": "n/a (no wrk/oha)", "ratio": None, "target": "ratio ≥ 0.50", "result": "n/a"})
            return
        base = sum(g["rps"] for g in gen) / len(gen)
        ratio = r["throughput"] / base
        self.figures.append({"figure": "fast single-threaded upstream: dispatch ÷ wrk -c64", "measured": f"{r['throughput']:,.0f} req/s",
                             "baseline": f"{base:,.0f} req/s ({tool} -c 64, mean of {len(gen)})", "ratio": ratio,
                             "target": "ratio ≥ 0.50", "result": "PASS" if ratio >= 0.5 else "MISS"})

    def online(self, seconds: float) -> list[tuple[float, float]]:
        """4 closed-loop online clients against the mock for `seconds`: (when answered, latency)."""
        assert self.mock is not None
        out: list[tuple[float, float]] = []
        lock = threading.Lock()
        body = json.dumps(chat_body(0, "an online user's question")).encode()
        end = time.perf_counter() + seconds

        def client(k: int) -> None:
            c = Client(self.mock.addr, timeout=30)
            i = 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                st, _ = c.request("POST", CHAT, body, {"Content-Type": "application/json"})
                t1 = time.perf_counter()
                if st == 200:
                    with lock:
                        out.append((t1, t1 - t0))
                i += 1
                time.sleep(0.02 + ((i * 37 + k * 13) % 60) / 1000)
            c.close()

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def limits_standby(self, seconds: int) -> None:
        self.mock_reset()
        self.mock_set(latency_ms=100, slots=16)
        unloaded = median([x[1] for x in self.online(2)])
        assert self.mock is not None
        toml = (f'[[upstreams]]\nname = "gpu"\nbase_url = "http://{self.mock.addr}/v1"\nmodels = ["*"]\n'
                f'mode = "standby"\nmax_concurrency = 64\n')
        path = self.work / "standby.jsonl"
        write_small(path, 4000)
        srv, api = self.serve_config("standby", toml)
        try:
            file_id, _ = upload(api.host + ":" + str(api.port), path)
            b = create_batch(api, file_id)
            result: list = []
            t = threading.Thread(target=lambda: result.extend(self.online(seconds + 3)), daemon=True)
            t.start()
            time.sleep(3)
            c0, t0 = api.json("GET", f"/v1/batches/{b['id']}")["request_counts"], time.perf_counter()
            time.sleep(seconds)
            c1, t1 = api.json("GET", f"/v1/batches/{b['id']}")["request_counts"], time.perf_counter()
            t.join()
            api.json("POST", f"/v1/batches/{b['id']}/cancel")
        finally:
            srv.stop()
        done = lambda c: c["completed"] + c["failed"]
        share = (done(c1) - done(c0)) / (t1 - t0) / 160.0
        loaded = median([x[1] for x in result if t0 <= x[0] <= t1])
        ratio = loaded / unloaded
        self.note(f"standby: online median {unloaded * 1000:.0f} ms alone, {loaded * 1000:.0f} ms beside the batch; "
                  f"the batch ran {(done(c1) - done(c0)) / (t1 - t0):,.0f} req/s of the server's 160 over {seconds} s")
        self.figures.append({"figure": "standby: online median latency ÷ unloaded", "measured": f"{loaded * 1000:.0f} ms",
                             "baseline": f"{unloaded * 1000:.0f} ms alone", "ratio": ratio, "target": "ratio ≤ 2",
                             "result": "PASS" if ratio <= 2 else "MISS"})
        self.figures.append({"figure": "standby: batch share of the server", "measured": f"{share * 160:,.0f} req/s",
                             "baseline": "160 req/s (16 slots / 100 ms)", "ratio": share, "target": "ratio ≥ 0.6",
                             "result": "PASS" if share >= 0.6 else "MISS"})

    # -- the run

    def run(self) -> int:
        print(machine_line(self.bin), flush=True)
        mode = "QUICK (smaller sizes than the budgets name; figures are indicative only)" if self.args.quick else "FULL"
        print(f"mode: {mode}; work dir {self.work}", flush=True)
        self.mock = Server("mock", [self.bin, "mock-upstream", "--listen", "127.0.0.1:0", "--seed", "1"],
                           cwd=self.work, log_dir=self.logs)
        self.mock_api = Client(self.mock.addr)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        only = set(self.args.only.split(",")) if self.args.only else None
        try:
            for name, f in (("dispatch", self.dispatch), ("saturation", self.saturation), ("big", self.big), ("flat", self.flat),
                            ("limits", self.limits), ("scale", self.scale), ("cluster", self.cluster),
                            ("prefix", self.prefix)):
                if only is None or name in only:
                    f()
        finally:
            self.drop_databases()
        elapsed = time.perf_counter() - t0
        self.mock.stop()
        load1 = os.getloadavg()
        print(f"\n[5/5] results ({mode.split()[0].lower()} mode, {elapsed:.0f}s; load average {load0[0]:.2f} at start, "
              f"{load1[0]:.2f} at end)\n", flush=True)
        print(table(self.figures))
        print()
        print(machine_line(self.bin))
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({
                "mode": "quick" if self.args.quick else "full", "machine": machine_info(self.bin), "sizes": self.sizes,
                "figures": self.figures, "details": self.details, "elapsed_s": elapsed,
                "loadavg": {"start": load0, "end": load1}}, indent=2, default=str))
        return 1 if self.had_error else 0


def machine_info(binary: str) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    ver = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(), "batchd": ver or "?"}


def machine_line(binary: str) -> str:
    m = machine_info(binary)
    return f"machine: nproc {m['nproc']}, CPU {m['cpu']}, memory {m['memory']}, Linux {m['kernel']}; {m['batchd']}"


def table(figs: list[dict]) -> str:
    head = ["figure", "measured", "baseline", "ratio", "target", "result"]
    rows = []
    for f in figs:
        ratio = "" if f.get("ratio") is None else f"{f['ratio']:.2f}{(' ' + f['ratio_note']) if f.get('ratio_note') else ''}"
        rows.append([f["figure"], str(f["measured"]), str(f["baseline"]), ratio, f["target"], f["result"]])
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()
    out = [line(head), line(["-" * x for x in w])] + [line(r) for r in rows]
    errs = [f"  {f['figure']}: {f['error']}" for f in figs if f.get("error")]
    if errs:
        out += ["", "errors:"] + errs
    return "\n".join(out)


def main() -> int:
    global _PIDFILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the batchd binary")
    ap.add_argument("--work", required=True, help="scratch directory (inputs, data dirs, logs)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, about 30 s")
    ap.add_argument("--only", help="comma list of dispatch,saturation,big,flat,limits,scale,cluster,prefix")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--pidfile", help="append the pid of every child here")
    args = ap.parse_args()
    if args.pidfile:
        _PIDFILE = Path(args.pidfile)
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
