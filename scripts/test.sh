#!/usr/bin/env bash
# Runs tern's whole test suite on this machine: installs what it needs (Debian packages,
# the guest image), then unit, integration and lab tests (real QEMU guests under TCG, real
# network namespaces). Needs root: the lab creates network namespaces and taps.
#
# Every test binary runs even when an earlier one failed (--no-fail-fast), and the run ends
# with a summary: each binary's counts and time, the failed tests by name, and one closing line
# "summary: N passed, N failed, N skipped". The exit status is cargo's (non-zero on any failure).
#
# Environment: TERN_TEST_TIMEOUT (seconds, default 3000) bounds the test run, so a hung test
# fails the run with a message instead of being killed with the CI job; TERN_TEST_LOG keeps
# the full output (default test-output.log in the target dir).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the lab needs network namespaces)" >&2; exit 1; }

started=$(date +%s)
# Each stage says when it began (seconds into the run): CI must end within 60 minutes, and
# this shows which stage a slower run spent its time in.
stage() { echo "== $1 (at $(( $(date +%s) - started )) s)"; }
bash scripts/setup.sh
stage "checking formatting"
cargo fmt --all -- --check
stage "linting"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
stage "building"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
target=${CARGO_TARGET_DIR:-target}
stage "building the guest image"
bash guest/build.sh "$target/guest"
stage "building the OS image"
bash guest/build-os.sh "$target/os"
stage "running tests"
tests_started=$(date +%s)
log=${TERN_TEST_LOG:-$target/test-output.log}
mkdir -p "$(dirname "$log")"
# Lab tests take a machine-wide lock, so one lab runs at a time; unit tests run in parallel.
set +e
timeout --kill-after=60 "${TERN_TEST_TIMEOUT:-3000}" \
  cargo test --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The center's API suites again, on the HA store: one etcd member on loopback, each test's
# center in a key prefix of its own. (handover_recovery edits the SQLite file between two
# runs of a center, which HA mode reloads from etcd: tests/ha.rs covers its ground there.
# --workspace, as above, so that no dependency is built again with other features; it adds
# tern-host's own tls test, which needs no center.)
ha_started=$(date +%s)
stage "the center's API suites on the HA store (etcd)" | tee -a "$log"
etcd_dir=$(mktemp -d)
etcd_url=http://127.0.0.1:23479
etcd --name suite --data-dir "$etcd_dir/data" --listen-client-urls "$etcd_url" \
  --advertise-client-urls "$etcd_url" --listen-peer-urls http://127.0.0.1:23480 \
  --initial-advertise-peer-urls http://127.0.0.1:23480 \
  --initial-cluster suite=http://127.0.0.1:23480 --logger zap --log-level warn \
  >"$etcd_dir/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$etcd_url" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
set +e
TERN_TEST_ETCD=$etcd_url timeout --kill-after=30 600 \
  cargo test --workspace --locked --no-fail-fast --test api --test drs_api \
  --test maintenance_api --test tokens --test hostile_clients --test host_identity --test tls \
  --test migration_driver -- --test-threads=2 2>&1 | tee -a "$log"
ha_status=${PIPESTATUS[0]}
set -e
kill "$etcd_pid" 2>/dev/null || true
wait "$etcd_pid" 2>/dev/null || true
rm -rf "$etcd_dir"
[ "$status" = 0 ] && status=$ha_status
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "test.sh: the tests did not finish within ${TERN_TEST_TIMEOUT:-3000} s; the run was stopped" >&2
  # A killed lab test leaves its lab behind: take down whatever test labs remain.
  for d in /var/tmp/tern-test-*/; do
    [ -f "$d/lab.json" ] && "$target/debug/tern" lab --dir "$d" down >/dev/null 2>&1 || true
  done
fi
echo "stages: setup, lint and builds $(( tests_started - started )) s; tests" \
  "$(( ha_started - tests_started )) s; API suites on etcd $(( $(date +%s) - ha_started )) s"
bash scripts/test-summary.sh "$log" "$started"
exit "$status"
