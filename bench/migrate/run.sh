#!/usr/bin/env bash
# Builds tern (for `tern lab`) and the guest image, then runs the migration benchmark (prints a
# markdown table; raw records as JSON lines under bench/migrate/out/). Flags: see --help.
# TERN_BENCH_BIN=PATH runs that tern binary instead of building one (e.g. a copy, so that
# others' work in the tree is neither compiled nor picked up during a long run).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/migrate: run as root (namespaces, taps, tc)" >&2; exit 1; }
bash scripts/setup.sh
if [ -z "${TERN_BENCH_BIN:-}" ]; then
  cargo build -p tern -q
fi
bash guest/build.sh target/guest >/dev/null
# The pgbench workload boots the Debian OS image (cached: a no-op once built).
case " $* " in
*" pgbench "* | *" --workload=pgbench "*) bash guest/build-os.sh target/os >/dev/null ;;
esac
exec python3 bench/migrate/harness.py "$@"
