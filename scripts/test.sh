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
bash scripts/setup.sh
echo "== checking formatting"
cargo fmt --all -- --check
echo "== linting"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "== building"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
target=${CARGO_TARGET_DIR:-target}
echo "== building the guest image"
bash guest/build.sh "$target/guest"
echo "== building the OS image"
bash guest/build-os.sh "$target/os"
echo "== running tests"
log=${TERN_TEST_LOG:-$target/test-output.log}
mkdir -p "$(dirname "$log")"
# Lab tests take a machine-wide lock, so one lab runs at a time; unit tests run in parallel.
set +e
timeout --kill-after=60 "${TERN_TEST_TIMEOUT:-3000}" \
  cargo test --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "test.sh: the tests did not finish within ${TERN_TEST_TIMEOUT:-3000} s; the run was stopped" >&2
  # A killed lab test leaves its lab behind: take down whatever test labs remain.
  for d in /var/tmp/tern-test-*/; do
    [ -f "$d/lab.json" ] && "$target/debug/tern" lab --dir "$d" down >/dev/null 2>&1 || true
  done
fi
bash scripts/test-summary.sh "$log" "$started"
exit "$status"
