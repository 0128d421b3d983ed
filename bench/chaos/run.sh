#!/usr/bin/env bash
# The chaos soak (crates/tern/tests/chaos.rs) at bench size: migrations in a lab, each with one
# random fault at a random moment, checked after every round; prints a table per fault kind.
#
#   bench/chaos/run.sh [--seed N] [--rounds N] [--hosts N] [--faults a,b,...]
#
# Defaults: seed 1, 200 rounds, 3 hosts, every fault kind. The fault kinds: none,
# kill-destination-qemu, kill-source-qemu, restart-destination-agent, restart-source-agent,
# restart-center, cut-destination-link, cancel, second-migrate. The whole log goes to
# bench/chaos/out/seed-N.log; CI runs the same test with 12 rounds.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/chaos: run as root (namespaces, taps, tc)" >&2; exit 1; }
seed=1 rounds=200 hosts=3 faults=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --faults) faults=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/chaos: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
cargo build -p tern --tests -q
bash guest/build.sh target/guest >/dev/null
mkdir -p bench/chaos/out
log=bench/chaos/out/seed-$seed.log
export TERN_CHAOS_SEED=$seed TERN_CHAOS_ROUNDS=$rounds TERN_CHAOS_HOSTS=$hosts
[ -n "$faults" ] && export TERN_CHAOS_FAULTS=$faults
set +e
cargo test -p tern --test chaos -q -- --nocapture > "$log" 2>&1
status=$?
set -e
sed -n '/^chaos soak, seed/,/^(pause and gap/p' "$log"
[ "$status" = 0 ] || { echo "bench/chaos: the soak failed (exit $status); see $log" >&2; grep -n "VIOLATIONS\|panicked" "$log" | head -20 >&2; }
exit "$status"
