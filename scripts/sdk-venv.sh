#!/usr/bin/env bash
# Create (or refresh) the Python venv used by the SDK end-to-end suite in tests/sdk.
#
#   PY="$(scripts/sdk-venv.sh | tail -n1)" && "$PY" -m pytest tests/sdk
#
# Idempotent: the venv (.venv-sdk in the repo root) is rebuilt only when it is missing or
# broken, and packages are reinstalled only when tests/sdk/requirements.txt changed since the
# last successful install. The venv's python path is the last line on stdout; all progress
# goes to stderr. Needs python3 >= 3.11 (the pinned openai SDK's HTTP library requires it)
# with its venv module, and access to PyPI. Set PYTHON to pick another interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="$repo/.venv-sdk"
req="$repo/tests/sdk/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "sdk-venv: need Python >= 3.11 as '$python' (set PYTHON=...); found: $("$python" --version 2>&1 || echo none)" >&2
    exit 1
fi

want="$("$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$req")"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "sdk-venv: creating $venv" >&2
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >&2; then
        echo "sdk-venv: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
# Keep the venv out of git without touching the repo's .gitignore.
[[ -f "$venv/.gitignore" ]] || echo '*' > "$venv/.gitignore"

have=""
[[ -f "$stamp" ]] && have="$(cat "$stamp")"
if [[ "$want" != "$have" ]]; then
    echo "sdk-venv: installing $req" >&2
    rm -f "$stamp"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req" >&2
    echo "$want" > "$stamp"
else
    echo "sdk-venv: up to date" >&2
fi

echo "$venv/bin/python"
