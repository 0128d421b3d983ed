#!/usr/bin/env bash
# The center's benchmark (crates/tern/tests/center_bench.rs): API write latency and
# throughput and the time to get a working leader back, SQLite (one center) against etcd
# (three centers, three members), each under N simulated hosts heartbeating; prints a table.
#
#   bench/center/run.sh [--hosts N] [--creates N] [--window S]
#
# Defaults: 1000 hosts, 200 sequential creates (then 400 by 8 clients), a 20 s window for the
# heartbeat rate and the leader's CPU and memory.
set -euo pipefail
cd "$(dirname "$0")/../.."
hosts=1000 creates=200 window=20
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts=$2; shift 2 ;;
    --creates) creates=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/center: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
cargo build -p tern --tests -q
export TERN_BENCH_HOSTS=$hosts TERN_BENCH_CREATES=$creates TERN_BENCH_WINDOW_S=$window
cargo test -p tern --test center_bench -q -- --ignored --nocapture 2>&1 \
  | grep -v '^running\|^test \|^$\|^test result'
