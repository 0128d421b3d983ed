#!/usr/bin/env bash
# Summarises a `cargo test` log: one line per test binary (counts, time), the tests that failed
# by name, and a closing line "summary: N passed, N failed, N skipped" (skipped = ignored).
# Usage: scripts/test-summary.sh LOG [STARTED_EPOCH_SECONDS]
set -euo pipefail
log=$1
started=${2:-}

echo
echo "== test summary"
awk '
  /^ *Running / {
    crate = $NF; gsub(/[()]/, "", crate); sub(/.*\//, "", crate); sub(/-[0-9a-f]+$/, "", crate)
    bin = ($2 == "unittests") ? crate " (" $3 ")" : crate " (" $2 ")"
  }
  /^ *Doc-tests / { bin = "doc-tests " $2 }
  /^test .* \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); failed[++nf] = bin ": " $0 }
  /^test result: / {
    p = 0; f = 0; i = 0; t = ""
    for (k = 1; k <= NF; k++) {
      if ($k ~ /^passed;?$/) p = $(k - 1)
      if ($k ~ /^failed;?$/) f = $(k - 1)
      if ($k ~ /^ignored;?$/) i = $(k - 1)
      if ($k == "in") t = $(k + 1)
    }
    P += p; F += f; I += i
    if (p + f + i > 0) printf "  %-70s %4d passed %3d failed %3d ignored %10s\n", bin, p, f, i, t
  }
  /^error: .*target.* failed/ { target_error = 1 }
  END {
    if (nf > 0) {
      print ""
      print "failed tests:"
      for (k = 1; k <= nf; k++) print "  " failed[k]
    }
    if (target_error && nf == 0) print "\na test binary failed without naming a test (crash or build error): see the log"
    print ""
    if (elapsed != "") print "whole run: " elapsed " s; full output in " logfile
    printf "summary: %d passed, %d failed, %d skipped\n", P, F, I
  }
' elapsed="${started:+$(( $(date +%s) - started ))}" logfile="$log" "$log"
