#!/usr/bin/env python3
"""Turns README.md's snippets into one bash script: the fresh-clone walk (scripts/readme-test.sh).

    python3 scripts/readme-walk.py README.md > walk.sh

Every ```sh line runs as written, except what needs the network or a second build, which is
replaced and says so on stderr: `cargo run --release -- ARGS` runs `batchd ARGS` (the binary of
this build is on PATH), `cargo install` is skipped (likewise), `podman`/`docker` are skipped
(scripts/container-test.sh runs the image), and `scripts/test.sh` is skipped (it is what runs
this). A `serve` in the foreground is started in the background, asked for /healthz and
stopped. After a block that starts servers with `&`, the walk waits for their ports. Each run of
consecutive ```python blocks is one program (the steps continue one another), run as written.
"""
import re
import shlex
import sys

FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(text):
    lang, buf = None, []
    for line in text.splitlines():
        m = FENCE.match(line)
        if lang is None and m:
            lang, buf = m.group(1) or "text", []
        elif lang is not None and line.startswith("```"):
            yield lang, buf
            lang = None
        elif lang is not None:
            buf.append(line)


def ports(line):
    """The ports a server line will listen on: --listen's, else 8080 for `serve`."""
    m = re.search(r"--listen\s+\S*:(\d+)", line)
    if m:
        return [m.group(1)]
    return ["8080"] if re.search(r"\bserve\b", line) else []


def sh_line(line):
    code = line.split("  #", 1)[0].rstrip()
    stripped = code.strip()
    if not stripped:
        return [], []
    if stripped.startswith("cargo run --release -- "):
        code = code.replace("cargo run --release -- ", "batchd ", 1)
        stripped = code.strip()
        print(f"walk: `{line.strip()}` runs as `{stripped}` (this build's binary)", file=sys.stderr)
    for prefix, why in (("cargo install", "this build's batchd is on PATH"), ("podman ", "scripts/container-test.sh runs the image"),
                        ("docker ", "scripts/container-test.sh runs the image"), ("scripts/test.sh", "it is what runs this walk")):
        if stripped.startswith(prefix):
            return [f"echo {shlex.quote(f'walk: skipped `{stripped}`: {why}')} >&2"], []
    if re.match(r"^batchd serve\b", stripped) and not stripped.endswith("&"):
        # The first command: a server in the foreground. Start it, ask it, stop it.
        return [f"{stripped} & first=$!", "wait_port 8080", "batchd health", "kill $first; wait $first || true",
                "echo 'walk: the first command serves /healthz' >&2"], []
    return [code], (ports(stripped) if stripped.endswith("&") else [])


def main():
    text = open(sys.argv[1], encoding="utf-8").read()
    out = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
           "wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; "
           "echo \"walk: nothing listens on $1\" >&2; return 1; }"]
    python = []
    n = 0

    def flush():
        nonlocal python
        if python:
            out.extend(["echo 'walk: python step' >&2", "python3 - <<'PY'", *python, "PY"])
            python = []

    for lang, lines in blocks(text):
        if lang == "python":
            python.extend(lines)
            continue
        if lang != "sh":
            continue
        flush()
        n += 1
        out.append(f"echo 'walk: sh block {n}' >&2")
        waits = []
        for line in lines:
            code, p = sh_line(line)
            out.extend(code)
            waits.extend(p)
        out.extend(f"wait_port {p}" for p in waits)
    flush()
    out.append("ls results/ | grep -q . || { echo 'walk: nothing downloaded into results/' >&2; exit 1; }")
    out.append("echo 'walk: every README snippet ran' >&2")
    print("\n".join(out))


if __name__ == "__main__":
    main()
