#!/usr/bin/env bash
# Builds tern and the guest image, then runs the boot benchmark (prints a markdown table).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
cargo build -p tern -q
bash guest/build.sh target/guest >/dev/null
exec python3 bench/boot/run.py "$@"
