#!/usr/bin/env bash
# Runs qkd's libFuzzer harnesses: run-fuzzers.sh BIN_DIR SECONDS WORK_DIR HARNESS...
# For each harness: replays every file of tests/fuzz/regressions/<harness> (past findings), then fuzzes for
# SECONDS from the seed corpus tests/fuzz/corpus/<harness>. New inputs go to WORK_DIR/<harness>/corpus (the
# committed seeds are never written to); a crashing input is saved as WORK_DIR/<harness>/crash-*, leak-*,
# timeout-* or oom-*. Exits 1 when any harness found anything. Run from the repository root.
set -uo pipefail
bin=$1 seconds=$2 work=$3
shift 3
failed=()
for h in "$@"; do
  exe="$bin/fuzz_$h"
  mkdir -p "$work/$h/corpus"
  log="$work/$h/log.txt"
  regressions=(tests/fuzz/regressions/"$h"/*)
  start=$(date +%s)
  status=0
  if [ -e "${regressions[0]}" ]; then
    "$exe" -runs=1 -artifact_prefix="$work/$h/" "${regressions[@]}" >"$log" 2>&1 || status=$?
  fi
  if [ "$status" -eq 0 ]; then
    # -timeout: one input taking 10 s is a finding (a hang); -rss_limit_mb: a loader that allocates what the
    # file merely claims is one too. -use_value_profile helps get past the magic numbers and length checks.
    "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -use_value_profile=1 -print_final_stats=1 \
      -artifact_prefix="$work/$h/" "$work/$h/corpus" tests/fuzz/corpus/"$h" >>"$log" 2>&1 || status=$?
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  if [ "$status" -eq 0 ]; then
    echo "fuzz_$h: ok, $(( $(date +%s) - start )) s, ${execs:-?} inputs, corpus $(ls "$work/$h/corpus" | wc -l) new files"
  else
    echo "fuzz_$h: FAILED (exit $status) after $(( $(date +%s) - start )) s; the log ends:"
    tail -n 60 "$log"
    ls "$work/$h"/crash-* "$work/$h"/leak-* "$work/$h"/timeout-* "$work/$h"/oom-* 2>/dev/null
    failed+=("$h")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: findings in ${failed[*]} (inputs under $work/<harness>/; add each to tests/fuzz/regressions/<harness>/)"
  exit 1
fi
echo "fuzz: all ${#@} harnesses clean"
