#!/usr/bin/env bash
# Start an S3-compatible server for the S3 tests and benchmarks: moto's server (moto[server]
# from PyPI, in its own venv .venv-s3 in the repo root, installed on first use), on 127.0.0.1
# and a free port, in the background.
#
#   eval "$(scripts/s3-server.sh start)"   # exports BATCHD_TEST_S3_URL, S3_SERVER_PID and
#                                           # placeholder AWS_* keys (moto accepts any)
#   scripts/s3-server.sh stop "$S3_SERVER_PID"
#
# `start` prints shell `export` lines on stdout (progress goes to stderr) once the server
# answers; it exits non-zero when it cannot start one (no python3 venv, no PyPI).
# Set PYTHON to pick another interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="$repo/.venv-s3"
python="${PYTHON:-python3}"
want="moto[server]==5.2.5"

ensure_venv() {
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        echo "s3-server: creating $venv" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv" >&2 || { echo "s3-server: '$python -m venv' failed" >&2; exit 1; }
        echo '*' > "$venv/.gitignore"
    fi
    if [[ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]]; then
        echo "s3-server: installing $want" >&2
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$want" >&2
        echo "$want" > "$venv/.installed"
    fi
}

free_port() {
    "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
    ensure_venv
    local port log pid
    port="$(free_port)"
    log="${TMPDIR:-/tmp}/batchd-moto-$port.log"
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
            echo "s3-server: moto listening on 127.0.0.1:$port (pid $pid, log $log)" >&2
            echo "export BATCHD_TEST_S3_URL=http://127.0.0.1:$port"
            echo "export S3_SERVER_PID=$pid"
            echo "export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-test}"
            echo "export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-test}"
            echo "export AWS_REGION=\${AWS_REGION:-us-east-1}"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "s3-server: moto exited; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    echo "s3-server: moto did not answer within 10 s" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) kill "${2:?stop needs the pid}" 2>/dev/null || true ;;
    *) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
