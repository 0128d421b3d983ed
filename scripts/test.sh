#!/usr/bin/env bash
# Runs tern's whole test suite on this machine: installs what it needs (Debian packages,
# the guest image), then unit, integration and lab tests (real QEMU guests under TCG, real
# network namespaces). Needs root: the lab creates network namespaces and taps.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the lab needs network namespaces)" >&2; exit 1; }

bash scripts/setup.sh
echo "== checking formatting"
cargo fmt --all -- --check
echo "== building"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
echo "== building the guest image"
bash guest/build.sh target/guest
echo "== running tests"
# Lab tests take a process-wide lock, so one lab runs at a time; unit tests run in parallel.
cargo test --workspace --locked -- --test-threads=2
