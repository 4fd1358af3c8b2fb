#!/usr/bin/env bash
# The fresh-clone walk of the README (run by scripts/test.sh): clones this repository (its
# committed HEAD) into a temporary directory, puts the built binary on PATH as `batchd` and the
# SDK venv's python3 first, and runs every README snippet in order (scripts/readme-walk.py says
# what is replaced and why: what needs a second build, a registry or this very test). Then every
# ```toml example of docs/configuration.md must be accepted by `batchd serve --print-config` as
# written, with none of the environment variables it names set.
#
#   scripts/readme-test.sh [BINARY]        # default: $CARGO_TARGET_DIR/debug/batchd
#
# As root, the walk runs in its own network namespace (unshare --net), so the README's fixed
# ports (8000, 8080) are free whatever else runs on the machine.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-${CARGO_TARGET_DIR:-$repo/target}/debug/batchd}")"
py="$("$repo/scripts/sdk-venv.sh" | tail -n1)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
mkdir "$work/bin"
ln -s "$bin" "$work/bin/batchd"
export PATH="$(dirname "$py"):$work/bin:$PATH"
for k in OPENAI_BASE_URL OPENAI_API_KEY BATCHD_UPSTREAM BATCHD_CONFIG BATCHD_LISTEN BATCHD_DATA_DIR BATCHD_SERVER BATCHD_API_KEY VLLM_API_KEY; do unset "$k"; done

python3 "$repo/scripts/readme-walk.py" "$work/clone/README.md" >"$work/walk.sh"
cd "$work/clone"
if [[ "$(id -u)" == 0 ]] && command -v unshare >/dev/null && command -v ip >/dev/null; then
    unshare --net -- bash -c 'ip link set lo up && exec bash "$0"' "$work/walk.sh"
else
    echo "readme-test: not root: the walk uses the machine's ports 8000 and 8080" >&2
    bash "$work/walk.sh"
fi

python3 - "$work/clone/docs/configuration.md" "$work" <<'PY'
import re, subprocess, sys
text = open(sys.argv[1], encoding="utf-8").read()
examples = re.findall(r"^```toml\n(.*?)^```", text, flags=re.S | re.M)
assert examples, "no ```toml example in docs/configuration.md"
for i, toml in enumerate(examples, 1):
    path = f"{sys.argv[2]}/example-{i}.toml"
    open(path, "w").write(toml)
    r = subprocess.run(["batchd", "serve", "--config", path, "--print-config"], capture_output=True, text=True, cwd=sys.argv[2])
    assert r.returncode == 0, f"docs/configuration.md example {i} is refused as written: {r.stderr}"
print(f"readme-test: {len(examples)} configuration example(s) accepted as written", file=sys.stderr)
PY
echo "readme-test: OK" >&2
