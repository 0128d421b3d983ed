#!/usr/bin/env bash
# Time to empty a host holding N small VMs, each with a client streaming from it: one
# migration at a time (what Proxmox and oVirt do by default) against tern's parallel plan
# (`tern host maintenance enter`), on the same lab and guests, with the worst client gap of
# each. Prints a markdown table; the whole log goes to bench/evacuate/out/run.log.
#
#   bench/evacuate/run.sh [--ns 2,4,8]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/evacuate: run as root (namespaces, taps)" >&2; exit 1; }
ns=2,4,8
while [ $# -gt 0 ]; do
  case "$1" in
    --ns) ns=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/evacuate: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
cargo build -p tern --tests -q
bash guest/build.sh target/guest >/dev/null
mkdir -p bench/evacuate/out
log=bench/evacuate/out/run.log
set +e
TERN_BENCH_EVACUATE_NS=$ns cargo test -p tern --test evacuate_bench -q -- --ignored --nocapture > "$log" 2>&1
status=$?
set -e
grep '^|' "$log"
[ "$status" = 0 ] || { echo "bench/evacuate: the run failed (exit $status); see $log" >&2; grep -n "panicked" "$log" | head >&2; }
exit "$status"
