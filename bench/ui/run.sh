#!/usr/bin/env bash
# The web client at scale: a lab center seeded with 1,000 hosts and 20,000 VMs, the REST
# API's whole listings against what the page asks for, the page's time to first render and
# to a search result in headless Chromium, and the center's memory with 50 event streams
# open. Prints a markdown table; the whole log goes to bench/ui/out/run.log.
#
#   bench/ui/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/ui: run as root (namespaces)" >&2; exit 1; }
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "bench/ui: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
bash scripts/setup.sh
cargo build -p tern --tests -q
bash guest/build.sh target/guest >/dev/null
mkdir -p bench/ui/out
log=bench/ui/out/run.log
set +e
cargo test -p tern --test ui_bench -q -- --ignored --nocapture > "$log" 2>&1
status=$?
set -e
grep '^|' "$log"
[ "$status" = 0 ] || { echo "bench/ui: the run failed (exit $status); see $log" >&2; grep -n "panicked" "$log" | head >&2; }
exit "$status"
