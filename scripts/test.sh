#!/usr/bin/env bash
# The full test suite: Rust unit, conformance and black-box tests (real binary, real SQLite,
# the project's mock upstream), then the official openai Python SDK suite against the real
# server, then the web console's tests in headless Chromium. Installs what it needs (a Python
# venv with the pinned SDK; Debian's chromium and playwright-core) by itself.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --rust     # only the Rust tests
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"

echo "== building (once) =="
cargo build --locked --bins --tests

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
