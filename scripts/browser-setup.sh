#!/usr/bin/env bash
# Installs what the console's browser tests (tests/browser) need, when it is missing:
# Debian's chromium (apt-get; no browser download of Playwright's own) and the pinned
# playwright-core (npm ci in tests/browser, redone only when package-lock.json changed).
#
#   scripts/browser-setup.sh && (cd tests/browser && npm test)
#
# Needs Node.js >= 20 with npm, and root (or sudo) for apt-get when chromium is missing.
# CHROMIUM names another browser binary (then nothing is installed with apt-get).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$repo/tests/browser"
chromium="${CHROMIUM:-/usr/bin/chromium}"

if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
    echo "browser-setup: need Node.js >= 20 with npm; found: $(node --version 2>&1 || echo none)" >&2
    exit 1
fi

if [[ ! -x "$chromium" ]]; then
    if [[ -n "${CHROMIUM:-}" ]]; then
        echo "browser-setup: CHROMIUM=$chromium is not an executable" >&2
        exit 1
    fi
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "browser-setup: chromium is missing; install Debian's chromium package as root" >&2; exit 1; }
        sudo="sudo"
    fi
    echo "browser-setup: installing chromium with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq --no-install-recommends chromium >&2
fi

lock="$dir/package-lock.json"
stamp="$dir/node_modules/.lock.sha256"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [[ ! -d "$dir/node_modules/playwright-core" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "browser-setup: npm ci in tests/browser" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    echo "$want" > "$stamp"
else
    echo "browser-setup: up to date" >&2
fi
