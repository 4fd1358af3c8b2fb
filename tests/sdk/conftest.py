"""Fixtures that spawn the real `batchd` binary (server and mock upstream).

BATCHD_BIN selects the binary (default: <repo>/target/debug/batchd). Logs of every spawned
process are kept under pytest's tmp dir and their tail is shown when a start fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from sdkutil import DEFAULT_BIN, MockUpstream, Proc, Server, loopback, make_config

MOCK_READY = r"mock-upstream listening on (http://\S+)"
SERVER_READY = r"batchd listening on (http://\S+)"


@pytest.fixture(scope="session")
def batchd_bin() -> Path:
    raw = os.environ.get("BATCHD_BIN")
    path = Path(raw) if raw else DEFAULT_BIN
    if not path.is_absolute() and not path.exists():
        found = shutil.which(str(path))
        path = Path(found) if found else path
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"batchd binary not found or not executable at {path}: build it with "
                    f"`cargo build` or point BATCHD_BIN at it", pytrace=False)
    return path.resolve()


class Launcher:
    """Starts mock upstreams and servers for one module and stops them all at its end."""

    def __init__(self, bin_path: Path, root: Path):
        self.bin = bin_path
        self.root = root
        self.logs = root / "logs"
        self.procs: list[Proc] = []
        self._n = 0

    def _tmp(self, prefix: str) -> Path:
        self._n += 1
        p = self.root / f"{prefix}-{self._n}"
        p.mkdir(parents=True)
        return p

    def mock(self, *args: str) -> MockUpstream:
        proc = Proc("mock-upstream", [self.bin, "mock-upstream", "--listen", "127.0.0.1:0", *args],
                    self.logs, MOCK_READY)
        self.procs.append(proc)
        url = proc.wait_ready(60).group(1)
        return MockUpstream(proc, loopback(url))

    def write_config(self, text: str) -> Path:
        path = self._tmp("config") / "batchd.toml"
        path.write_text(text)
        return path

    def server_args(self, *, data_dir: Path, config: Path | None, upstream: str | None,
                    listen: str, extra: Sequence[str]) -> list[Any]:
        args: list[Any] = [self.bin, "serve", "--listen", listen, "--data-dir", data_dir]
        if config is not None:
            args += ["--config", config]
        if upstream is not None:
            args += ["--upstream", upstream]
        return args + list(extra)

    def server(self, config: str | Path | None = None, *, upstream: str | None = None,
               data_dir: Path | None = None, listen: str = "127.0.0.1:0",
               extra: Sequence[str] = (), timeout: float = 60.0) -> Server:
        """Start `batchd serve` and wait for its ready line. `config` is TOML text or a path."""
        if isinstance(config, str):
            config = self.write_config(config)
        data_dir = data_dir or self._tmp("data")
        data_dir.mkdir(parents=True, exist_ok=True)
        proc = Proc("batchd", self.server_args(data_dir=data_dir, config=config, upstream=upstream,
                                               listen=listen, extra=extra), self.logs, SERVER_READY)
        self.procs.append(proc)
        url = proc.wait_ready(timeout).group(1)
        return Server(proc, loopback(url), data_dir, config)

    def run_to_exit(self, args: Sequence[Any], timeout: float = 30.0) -> tuple[int | None, Proc]:
        """Run the binary with `args`, expecting it to exit by itself; returns (code or None, proc)."""
        proc = Proc("batchd-run", [self.bin, *args], self.logs, None)
        self.procs.append(proc)
        return proc.wait_exit(timeout), proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def launcher(batchd_bin: Path, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[Launcher]:
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    la = Launcher(batchd_bin, root)
    try:
        yield la
    finally:
        la.stop_all()


@pytest.fixture(scope="module")
def mock(launcher: Launcher) -> MockUpstream:
    """One mock upstream per module."""
    return launcher.mock()


@pytest.fixture(scope="module")
def server(launcher: Launcher, mock: MockUpstream) -> Server:
    """One batchd per module, no tenants, the standard config (see sdkutil.make_config).
    Modules that need another setup override this fixture."""
    return launcher.server(make_config(mock.base_url))


@pytest.fixture(scope="module")
def client(server: Server):
    return server.client()
