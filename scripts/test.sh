#!/usr/bin/env bash
# The full test suite: the style gates (rustfmt, clippy), Rust unit, conformance and black-box tests (real binary, real SQLite,
# the project's mock upstream), then the official openai Python SDK suite against the real
# server, then the web console's tests in headless Chromium. Installs what it needs (a Python
# venv with the pinned SDK; Debian's chromium and playwright-core) by itself.
#
# The PostgreSQL and S3 tests run against the local PostgreSQL server (127.0.0.1:5432, trust
# auth; started when it is down) and a moto S3 server that scripts/s3-server.sh starts for the
# run. Set BATCHD_TEST_POSTGRES_URL / BATCHD_TEST_S3_URL yourself to use other servers, or to
# an empty value to skip those tests.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --rust     # only the Rust tests
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"

echo "== style gates: rustfmt (rustfmt.toml) and clippy, warnings as errors =="
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

echo "== building (once) =="
cargo build --locked --bins --tests

echo "== PostgreSQL and S3 for the scale-out tests =="
if [[ -z "${BATCHD_TEST_POSTGRES_URL+set}" ]]; then
    if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
        echo "starting the local PostgreSQL server"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
        for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
    fi
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        export BATCHD_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
    elif [[ "${CI:-}" == "true" ]]; then
        echo "ERROR: no PostgreSQL server on 127.0.0.1:5432; CI does not skip the PostgreSQL tests" >&2
        exit 1
    else
        echo "WARNING: no PostgreSQL server on 127.0.0.1:5432; the PostgreSQL tests will be skipped" >&2
    fi
fi
if [[ -z "${BATCHD_TEST_S3_URL+set}" ]]; then
    if s3env="$(scripts/s3-server.sh start)"; then
        eval "$s3env"
        trap 'scripts/s3-server.sh stop "$S3_SERVER_PID"' EXIT
    elif [[ "${CI:-}" == "true" ]]; then
        echo "ERROR: could not start the S3 test server; CI does not skip the S3 tests" >&2
        exit 1
    else
        echo "WARNING: could not start the S3 test server; the S3 tests will be skipped" >&2
    fi
fi
# libfaketime, for the skewed-clock cluster test (Debian's faketime; skipped without it).
if [[ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 && ! -e /usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1 ]]; then
    sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    echo "== installing faketime with apt-get (the skewed-clock test) ==" >&2
    if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq faketime >&2 \
        || { $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq faketime >&2; }; }; then
        echo "WARNING: could not install faketime; the skewed-clock test will be skipped" >&2
    fi
fi
[[ -n "${BATCHD_TEST_POSTGRES_URL:-}" ]] || unset BATCHD_TEST_POSTGRES_URL
[[ -n "${BATCHD_TEST_S3_URL:-}" ]] || unset BATCHD_TEST_S3_URL

echo "== Rust tests =="
cargo test --locked --no-fail-fast

if [[ "${1:-}" == "--rust" ]]; then
    exit 0
fi

echo "== openai SDK tests =="
py="$(scripts/sdk-venv.sh | tail -n1)"
BATCHD_BIN="$target/debug/batchd" "$py" -m pytest -q tests/sdk

echo "== web console tests (headless Chromium) =="
scripts/browser-setup.sh
(cd tests/browser && BATCHD_BIN="$target/debug/batchd" npm test --silent)
