#!/usr/bin/env bash
# The container image test (run by scripts/test.sh): packs the binary already built for the
# tests (no compiling in a container) into the Containerfile's runtime stage, on a Debian base
# made here (no image registry is reachable on CI machines), and checks what users get:
#
# - the image runs as a non-root user, its HEALTHCHECK (`batchd health`) passes, `batchd
#   --version` names the commit;
# - a batch goes through the published port with the official openai SDK, against the mock
#   upstream running from the same image in the same pod, with the config in a mounted file and
#   the data in a volume;
# - `podman stop` (SIGTERM) in the middle of a batch ends well inside the grace period with exit
#   code 0, and the batch finishes after a restart on the same volume;
# - compose.yaml's batchd service, with its environment as written, on PostgreSQL and S3: the
#   postgres and minio images need a registry, so the local PostgreSQL and the moto S3 server
#   stand in for them (the test says so).
#
#   scripts/container-test.sh [BINARY]     # default: $CARGO_TARGET_DIR/debug/batchd
#
# Needs root (podman as root, with runc) and Debian's podman, runc, catatonit (a pod's
# infra container) and mmdebstrap (installed
# with apt-get when missing). The base image (localhost/batchd-base:bookworm) is made once by
# `mmdebstrap --variant=minbase bookworm` + `podman import` and kept in podman's storage.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${1:-$target/debug/batchd}"
base="localhost/batchd-base:bookworm"
image="localhost/batchd:ci"
run_id="batchd-ci-$$"
ulimits=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
# No systemd here to time health checks: the test runs them itself (`podman healthcheck run`).
notimer=(--health-interval disable)
# podman, less its complaints that there is no systemd to time health checks.
podman() { command podman --runtime runc "$@" 2> >(grep -v 'systemd connection' >&2); }
say() { echo "container-test: $*" >&2; }

[[ -x "$bin" ]] || { say "no binary at $bin (build it first: cargo build)"; exit 1; }
[[ "$(id -u)" == 0 ]] || { say "needs root (podman as root with runc)"; exit 1; }
missing=()
for p in podman runc mmdebstrap catatonit; do command -v "$p" >/dev/null || missing+=("$p"); done
if ((${#missing[@]})); then
    say "installing ${missing[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc catatonit mmdebstrap >&2
fi

if ! podman image exists "$base"; then
    say "making $base (mmdebstrap --variant=minbase bookworm; once, then cached)"
    mmdebstrap --quiet --variant=minbase bookworm - | podman import - "$base" >/dev/null
fi

work="$(mktemp -d)"
# The ulimits also for what podman starts by itself (a pod's infra container): the defaults it
# asks for (nofile 1048576) are refused on these machines.
cat >"$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"
cleanup() {
    podman pod rm -f "$run_id" >/dev/null 2>&1 || true
    podman rm -f "$run_id-compose" "$run_id-mock2" >/dev/null 2>&1 || true
    podman volume rm -f "$run_id-data" >/dev/null 2>&1 || true
    podman rmi -f "$image" >/dev/null 2>&1 || true
    [[ -n "${mock_pid:-}" ]] && kill "$mock_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

say "building $image from the Containerfile's prebuilt stage on $base ($(du -h "$bin" | cut -f1) binary)"
mkdir "$work/ctx"
cp Containerfile "$work/ctx/"
cp "$bin" "$work/ctx/batchd"
t0=$SECONDS
podman build -q "${ulimits[@]}" --pull=never --format docker --target prebuilt \
    --build-arg BASE="$base" --build-arg BINARY=batchd -t "$image" "$work/ctx" >/dev/null
say "image built in $((SECONDS - t0)) s"
rm -rf "$work/ctx"

# What the image says about itself.
[[ "$(podman image inspect -f '{{.Config.User}}' "$image")" == "10001:10001" ]] || { say "image user is not 10001:10001"; exit 1; }
podman image inspect -f '{{.Config.Healthcheck.Test}}' "$image" | grep -q "batchd health" || { say "no HEALTHCHECK in the image"; exit 1; }
podman image inspect -f '{{json .Config.Volumes}}' "$image" | grep -q '"/data"' || { say "no /data volume"; exit 1; }
version="$(podman run --rm "${ulimits[@]}" --no-healthcheck "$image" --version)"
say "in the image: $version"
[[ "$version" =~ \(commit\ [0-9a-f]{7,}\) ]] || { say "--version does not name a commit: $version"; exit 1; }

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$work/batchd.toml" <<TOML
[[tenants]]
name = "ci"
api_keys = ["sk-container-ci"]

[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:8000/v1"
models = ["*"]
max_concurrency = 16
TOML
chmod 0644 "$work/batchd.toml"

say "pod $run_id: mock upstream + batchd from the image, port 8080 published on 127.0.0.1:$port"
podman pod create --name "$run_id" -p "127.0.0.1:$port:8080" >/dev/null
podman volume create "$run_id-data" >/dev/null
podman run -d --pod "$run_id" --name "$run_id-mock" "${ulimits[@]}" --no-healthcheck "$image" mock-upstream --listen 127.0.0.1:8000 --latency-ms 5 >/dev/null
start_batchd() {
    podman run -d --pod "$run_id" --name "$run_id-batchd" "${ulimits[@]}" "${notimer[@]}" \
        -v "$work/batchd.toml:/etc/batchd/batchd.toml:ro" -v "$run_id-data:/data" "$image" >/dev/null
}
start_batchd
healthy() {
    for _ in $(seq 1 100); do
        podman healthcheck run "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "$1 never became healthy; its log:"; podman logs "$1" >&2; return 1
}
healthy "$run_id-batchd"
[[ "$(podman exec "$run_id-batchd" id -u)" == 10001 ]] || { say "batchd does not run as uid 10001"; exit 1; }

py="$(scripts/sdk-venv.sh | tail -n1)"
api="http://127.0.0.1:$port/v1"
say "a batch through the published port with the openai SDK"
"$py" tests/container/drive.py "$api" sk-container-ci 50

say "SIGTERM in the middle of a batch (40 lines of 2 s, 16 at a time): a stop within the grace, exit 0, resumed after a restart"
id="$("$py" tests/container/drive.py "$api" sk-container-ci --submit-only 40 2000)"
sleep 3
t0=$SECONDS
podman stop -t 30 "$run_id-batchd" >/dev/null
took=$((SECONDS - t0))
code="$(podman inspect -f '{{.State.ExitCode}}' "$run_id-batchd")"
say "stopped in ${took} s, exit code $code"
((took < 25)) || { say "the stop took $took s: too close to a 30 s grace period"; exit 1; }
[[ "$code" == 0 ]] || { say "exit code $code after SIGTERM (137 = killed at the end of the grace)"; podman logs "$run_id-batchd" 2>&1 | tail -20 >&2; exit 1; }
podman logs "$run_id-batchd" 2>&1 | grep -q "shutdown signal received" || { say "no graceful shutdown in the log"; exit 1; }
podman rm "$run_id-batchd" >/dev/null
start_batchd
healthy "$run_id-batchd"
"$py" tests/container/drive.py "$api" sk-container-ci --wait "$id" 40
podman pod rm -f "$run_id" >/dev/null

compose_service() {
    if [[ -z "${BATCHD_TEST_POSTGRES_URL:-}" || -z "${BATCHD_TEST_S3_URL:-}" ]]; then
        say "SKIPPED compose: needs BATCHD_TEST_POSTGRES_URL and BATCHD_TEST_S3_URL (scripts/test.sh sets them)"
        return 0
    fi
    say "compose.yaml: no registry here for its postgres and minio images, and no compose tool;"
    say "  running its batchd service (image, command, environment as written) with the local PostgreSQL and moto S3 in their place"
    local env_file="$work/compose.env" cport mock_url bucket
    cport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "$bin" mock-upstream --listen 127.0.0.1:0 --latency-ms 5 >"$work/mock.out" 2>/dev/null &
    mock_pid=$!
    for _ in $(seq 1 100); do grep -q "listening on" "$work/mock.out" && break; sleep 0.1; done
    mock_url="$(sed -n 's/^mock-upstream listening on //p' "$work/mock.out")/v1"
    bucket="batchd-compose-$$"
    "$py" - "$BATCHD_TEST_S3_URL" "$bucket" <<'PY'
import sys, urllib.request
req = urllib.request.Request(f"{sys.argv[1]}/{sys.argv[2]}", method="PUT")
urllib.request.urlopen(req).read()
PY
    python3 - compose.yaml "$env_file" "$cport" "$BATCHD_TEST_POSTGRES_URL" "$BATCHD_TEST_S3_URL" "$mock_url" "$bucket" <<'PY'
import sys, yaml
compose, out, port, pg, s3, mock, bucket = sys.argv[1:]
svc = yaml.safe_load(open(compose))["services"]["batchd"]
assert svc["command"] == ["serve"], svc["command"]
env = dict(svc["environment"])
# The services' names stand for the local servers: postgres → the test database, s3 → moto,
# mock → a mock upstream on the host; the bucket gets this run's name.
assert env["BATCHD_DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["BATCHD_DATABASE_URL"]
env["BATCHD_DATABASE_URL"] = pg
assert env["BATCHD_BLOB_URL"].startswith("s3://batchd-files/")
env["BATCHD_BLOB_URL"] = env["BATCHD_BLOB_URL"].replace("batchd-files", bucket)
assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
env["AWS_ENDPOINT_URL"] = s3
assert env["BATCHD_UPSTREAM"] == "http://mock:8000/v1"
env["BATCHD_UPSTREAM"] = mock
env["BATCHD_LISTEN"] = f"127.0.0.1:{port}"
open(out, "w").write("".join(f"{k}={v}\n" for k, v in env.items()))
PY
    podman run -d --name "$run_id-compose" --network host "${ulimits[@]}" --no-healthcheck --env-file "$env_file" "$image" serve >/dev/null
    for _ in $(seq 1 100); do podman exec "$run_id-compose" batchd health --url "http://127.0.0.1:$cport/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
    "$py" tests/container/drive.py "http://127.0.0.1:$cport/v1" unused 20
    podman rm -f "$run_id-compose" >/dev/null
}
compose_service
say "OK"
