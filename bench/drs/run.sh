#!/bin/sh
# DRS benchmark: builds the tern-drs bench in release and prints a markdown table.
#   bench/drs/run.sh            full run (about 1–2 minutes on 2 cores after the build)
#   bench/drs/run.sh --quick    4× shorter horizons (smoke test)
set -eu
cd "$(dirname "$0")/../.."
: "${CARGO_TARGET_DIR:=target}"
export CARGO_TARGET_DIR
cargo build --quiet --release -j 2 -p tern-drs --example drs_bench
exec "$CARGO_TARGET_DIR/release/examples/drs_bench" --trace bench/drs/trace "$@"
