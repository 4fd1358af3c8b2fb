#!/usr/bin/env bash
# batchd benchmark suite: measures the performance budgets of DESIGN.md and prints a table.
#
#   bench/run.sh            full sizes (20k / 25.6k / 100k-line 200 MB batches, 100k and 1M-line
#                           300-byte-line batches and a kill -9 mid-1M, limits, scale), about 6-9 minutes
#   bench/run.sh --quick    smaller sizes, about 2 minutes (figures are indicative only)
# (plus the release build when it is not up to date: about 3 minutes from scratch on 2 cores)
#
# Options:
#   --quick         smaller sizes
#   --no-build      do not run `cargo build --release --bin batchd` (use the binary as it is)
#   --only LIST     comma list of dispatch,saturation,big,flat,limits,scale,cluster,prefix,remote, and build:
#                   a cold `cargo build --release` of `git archive HEAD` (a tree without .git,
#                   as from a tarball) in a scratch target dir, timed (wall and CPU), with the
#                   binary's size against its 40 MB budget, its split debug info and cargo's
#                   per-crate --timings report (bench/.last-build-timings.html) (only when
#                   named: it takes 20 minutes to an hour on 2 shared cores; not run in CI)
#   --keep          keep the scratch directory (inputs, data dirs, logs of every process)
#   --json FILE     also write the results as JSON (default: bench/.last-run.json)
#   BATCHD_BIN=PATH use that binary instead of target/release/batchd (implies --no-build)
#
# The scale figures (one node on PostgreSQL + S3 against the embedded default, two nodes
# against one, store transactions per 1,000 results on PostgreSQL) and the cluster figures
# (the cross-node cancel delay beside one node's) need PostgreSQL (taken from
# BATCHD_BENCH_POSTGRES_URL, else 127.0.0.1:5432 when it answers) and an S3 server
# (BATCHD_BENCH_S3_URL, else moto started by scripts/s3-server.sh); without them they are n/a.
#
# It builds batchd in release mode (a no-op when up to date), installs wrk with apt-get when
# it is missing and this is root (else uses oha if present, else reports the baseline n/a),
# then runs bench/bench.py. Everything listens on 127.0.0.1 only; every process it starts is
# killed on exit, however it exits. Exit code: 0 when every figure was measured, PASS or
# MISS alike (benchmarks report, tests assert); 1 when a figure could not be measured
# (ERROR in the table) or the harness failed; 2 for bad usage.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
QUICK=""
BUILD=1
KEEP=0
ONLY=""
JSON="$HERE/.last-run.json"

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --only) ONLY="${2:?--only needs a list}"; shift ;;
    --json) JSON="${2:?--json needs a file}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# --only build: the cold release build, measured on its own (see the usage above).
build_step() {
  local scratch secs bin dwp size load0 load1 version
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/batchd-build.XXXXXX")"
  trap 'rm -rf "$scratch"' RETURN
  mkdir "$scratch/src"
  git -C "$REPO" archive HEAD | tar -x -C "$scratch/src"
  load0="$(cut -d' ' -f1 /proc/loadavg)"
  echo "== cold cargo build --release (git archive HEAD, no .git; scratch target $scratch/target; load $load0)"
  # Wall time depends on what else the machine runs; CPU time (user + sys of cargo, rustc
  # and the linker, summed over every process) is the build's own cost. Bash's `time`
  # writes "wall user sys" to fd 2, which goes to a file; cargo's own messages keep the
  # terminal's stderr (fd 3).
  local TIMEFORMAT='%R %U %S' cpu user sys
  { time (cd "$scratch/src" && CARGO_TARGET_DIR="$scratch/target" cargo build --release --locked --bin batchd -q --timings 2>&3); } 3>&2 2>"$scratch/time"
  read -r secs user sys <"$scratch/time"
  cpu=$(echo "$user + $sys" | bc)
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  bin="$scratch/target/release/batchd"
  dwp="$scratch/target/release/batchd.dwp"
  size=$(stat -c %s "$bin")
  version="$("$bin" --version)"
  printf '\n| figure | measured | budget | ratio |\n|---|---|---|---|\n'
  printf '| cold `cargo build --release` (load %s → %s, %s cores) | %.0f s (%dm%02.0fs) | report | |\n' "$load0" "$load1" "$(nproc)" "$secs" "$(echo "$secs / 60" | bc)" "$(echo "$secs % 60" | bc)"
  printf '| its CPU time (user %.0f s + sys %.0f s; wall × cores = %.0f s) | %.0f s (%dm%02.0fs) | report | |\n' "$user" "$sys" "$(echo "$secs * $(nproc)" | bc)" "$cpu" "$(echo "$cpu / 60" | bc)" "$(echo "$cpu % 60" | bc)"
  printf '| release binary size | %.1f MB | 40 MB | %.2f |\n' "$(echo "$size / 1000000" | bc -l)" "$(echo "$size / 40000000" | bc -l)"
  if [ -f "$dwp" ]; then
    printf '| split debug info (batchd.dwp, keep for crash reports) | %.1f MB | report | |\n' "$(echo "$(stat -c %s "$dwp") / 1000000" | bc -l)"
  else
    printf '| split debug info | MISSING: no %s | | |\n' "$dwp"
  fi
  printf '| `batchd --version` from a tree without .git | %s | | |\n' "$version"
  # Which crates the time goes to: cargo's per-crate report, kept beside the JSON results.
  cp "$scratch/target/cargo-timings/cargo-timing.html" "$HERE/.last-build-timings.html"
  echo "per-crate build times: bench/.last-build-timings.html"
}
if [[ ",$ONLY," == *",build,"* ]]; then
  build_step
  ONLY="$(echo ",$ONLY," | sed 's/,build,/,/; s/^,//; s/,$//')"
  [ -z "$ONLY" ] && exit 0
fi

BIN="${BATCHD_BIN:-$REPO/target/release/batchd}"
if [ -n "${BATCHD_BIN:-}" ]; then BUILD=0; fi

if [ "$BUILD" = 1 ]; then
  echo "== cargo build --release --bin batchd"
  if ! (cd "$REPO" && cargo build --release --bin batchd); then
    if [ -x "$BIN" ]; then
      echo "WARNING: the build failed; benchmarking the existing binary $BIN (built $(date -r "$BIN" '+%F %T'))" >&2
    else
      echo "error: the build failed and there is no $BIN" >&2
      exit 1
    fi
  fi
fi
if [ ! -x "$BIN" ]; then
  echo "error: no batchd binary at $BIN (run without --no-build, or set BATCHD_BIN)" >&2
  exit 1
fi
echo "== binary: $BIN, $(( $(stat -c %s "$BIN") / 1000000 )) MB (budget 40 MB; cold build time: --only build)"

if ! command -v wrk >/dev/null 2>&1 && ! command -v oha >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing wrk (apt-get install -y wrk)"
    (apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; }) \
      || echo "WARNING: could not install wrk; the dispatch baseline will be n/a" >&2
  else
    echo "WARNING: neither wrk nor oha is installed; the dispatch baseline will be n/a" >&2
  fi
fi

PY="python3"
if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/batchd-bench.XXXXXX")"
PIDFILE="$WORK/pids"
: >"$PIDFILE"
PYPID=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$PYPID" ] && kill -0 "$PYPID" 2>/dev/null; then
    kill -TERM "$PYPID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PYPID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$PYPID" 2>/dev/null || true
  fi
  # Anything bench.py started and did not reap (it writes each child's pid here).
  while read -r pid; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done <"$PIDFILE"
  if [ "$KEEP" = 1 ]; then
    echo "scratch directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [ -z "$ONLY" ] || [[ ",$ONLY," == *",scale,"* ]] || [[ ",$ONLY," == *",cluster,"* ]]; then
  if [ -z "${BATCHD_BENCH_POSTGRES_URL:-}" ] && command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
    export BATCHD_BENCH_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
  fi
  if [ -n "${BATCHD_BENCH_POSTGRES_URL:-}" ] && [ -z "${BATCHD_BENCH_S3_URL:-}" ]; then
    echo "== starting an S3 server for the scale figures (scripts/s3-server.sh)"
    if S3ENV="$("$REPO/scripts/s3-server.sh" start)"; then
      eval "$S3ENV"
      echo "$S3_SERVER_PID" >>"$PIDFILE"
      export BATCHD_BENCH_S3_URL="$BATCHD_TEST_S3_URL"
    else
      echo "WARNING: no S3 server; the scale figures will be n/a" >&2
    fi
  fi
fi

ARGS=(--bin "$BIN" --work "$WORK" --pidfile "$PIDFILE" --json "$JSON")
[ -n "$QUICK" ] && ARGS+=("$QUICK")
[ -n "$ONLY" ] && ARGS+=(--only "$ONLY")

echo "== bench/bench.py ${QUICK:-(full)}"
# In the background, so that a signal reaches the trap at once instead of after python exits.
"$PY" "$HERE/bench.py" "${ARGS[@]}" &
PYPID=$!
set +e
wait "$PYPID"
RC=$?
set -e
PYPID=""
echo "results also in $JSON"
exit "$RC"
