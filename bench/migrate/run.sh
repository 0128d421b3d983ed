#!/usr/bin/env bash
# Builds tern (for `tern lab`) and the guest image, then runs the migration benchmark (prints a
# markdown table; raw records as JSON lines under bench/migrate/out/). Flags: see --help.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/migrate: run as root (namespaces, taps, tc)" >&2; exit 1; }
bash scripts/setup.sh
cargo build -p tern -q
bash guest/build.sh target/guest >/dev/null
exec python3 bench/migrate/harness.py "$@"
