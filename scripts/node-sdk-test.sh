#!/usr/bin/env bash
# The openai Node SDK suite (tests/sdk-node) against a built batchd binary: `npm ci` from the
# committed lockfile (redone only when it changed), then `node --test`.
#
#   scripts/node-sdk-test.sh [BINARY]       # default: $CARGO_TARGET_DIR/debug/batchd
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$repo/tests/sdk-node"
bin="$(realpath "${1:-${CARGO_TARGET_DIR:-$repo/target}/debug/batchd}")"
lock="$dir/package-lock.json"
stamp="$dir/node_modules/.lock.sha256"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [[ ! -d "$dir/node_modules/openai" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "node-sdk-test: npm ci in tests/sdk-node" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --silent >&2)
    echo "$want" >"$stamp"
fi
cd "$dir" && BATCHD_BIN="$bin" npm test --silent
