#!/usr/bin/env bash
# One call on the GPU machine: configure and build everything (Release, Ninja), run the GPU tests
# (ctest -L gpu) and the CPU tests, qkd-bench on the llama2-7b preset (int4 and bf16) and tinyllama-1.1b
# (int4), the PyTorch peers (bench/peers.py), and print a short table last. Sized to fit a 10-minute call;
# the options leave parts out.
#
#   tools/gpu-check.sh [--tests-only | --bench-only | --train-bench | --targets LIST] [--no-cpu-tests] [--no-peers]
#                      [--memcheck] [--sanitize] [--jobs N] [--budget SECONDS]
# --budget skips the steps that would start after that many seconds (the build always runs); --memcheck runs
# compute-sanitizer memcheck over two cases of test_gpu_model; --sanitize runs memcheck over every GPU test binary
# (each cut at 60 s) and racecheck over the kernel tests, a line each in the table. --train-bench runs only the training-step
# benchmark of issue 5 instead: it builds qkd-bench alone, runs qkd-bench --train on tinyllama-1.1b (batch 8 x
# 1024), the PyTorch peer bench/train_peers.py (eager and torch.compile; --no-peers leaves it out) and
# bench/compare_train.py (about 5 minutes with the build). --targets qkd-train,qkd-eval builds only those
# targets and runs nothing (for scripts such as tools/ov-freeze-table.sh that run the tools themselves).
#
# Logs and JSON go to $OUT when it is set (the device tool fetches it; at most 8 files), else to
# build-gpu-check/out. The build folder is $QKD_GPU_BUILD (default /tmp/qkd-gpu-check).
# The GPU machine's image has no fmt, doctest, nlohmann_json or sentencepiece and no package registry: run
# tools/device-deps.sh here first and carry .carry (its .carry/deps/env.sh is sourced), or point QKD_DEPS at
# a prefix holding usr/include, usr/lib/... and usr/bin/pkgconf (@DEPS@ placeholders in its .pc and CMake
# files are filled in here). Shared test data: QKD_SHARED_DATA, or .carry/shared when it exists.
set -u -o pipefail

tests=1 bench=1 cpu_tests=1 peers=1 memcheck=0 sanitize=0 train_bench=0 jobs=16 budget=0 only_targets=
while (($#)); do
  case "$1" in
    --tests-only) bench=0 ;;
    --bench-only) tests=0 ;;
    --train-bench) train_bench=1 tests=0 bench=0 ;;
    --targets) only_targets="$2" tests=0 bench=0; shift ;;
    --no-cpu-tests) cpu_tests=0 ;;
    --no-peers) peers=0 ;;
    --memcheck) memcheck=1 ;;
    --sanitize) sanitize=1 ;;
    --jobs) jobs="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build-gpu-check/out}
mkdir -p "$OUT"
B=${QKD_GPU_BUILD:-/tmp/qkd-gpu-check}
LOG=$OUT/run.log
: > "$LOG"
summary=()
note() { summary+=("$1"); echo "$1" | tee -a "$LOG"; }

# ------------------------------------------------------------------------------------------ environment
cmake_extra=()
if [ -f "$ROOT/.carry/deps/env.sh" ]; then  # written by tools/device-deps.sh
  . "$ROOT/.carry/deps/env.sh"
elif [ -n "${QKD_DEPS:-}" ]; then  # a prefix with usr/ whose files name @DEPS@ as their location
  D=$QKD_DEPS/usr
  grep -rl "@DEPS@" "$D" 2>/dev/null | xargs -r sed -i "s|@DEPS@|$D|g"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$D/lib/x86_64-linux-gnu" "$D/bin/pkgconf" > "$D/bin/pkg-config"
  chmod +x "$D/bin/pkg-config"
  export PKG_CONFIG_PATH=$D/lib/x86_64-linux-gnu/pkgconfig
  export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  cmake_extra=(-DCMAKE_PREFIX_PATH="$D" -DPKG_CONFIG_EXECUTABLE="$D/bin/pkg-config")
fi
if [ -z "${QKD_SHARED_DATA:-}" ] && [ -d "$ROOT/.carry/shared/models" ]; then
  export QKD_SHARED_DATA=$ROOT/.carry/shared
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$jobs}
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv,noheader \
  2>&1 | tee -a "$LOG"
echo "shared data: ${QKD_SHARED_DATA:-../shared/data (default)}" | tee -a "$LOG"

# ---------------------------------------------------------------------------------------------- build
T0=$SECONDS
targets=()
((train_bench)) && targets=(--target qkd-bench)  # the training benchmark needs nothing else
[ -n "$only_targets" ] && targets=(--target ${only_targets//,/ })
# -k 0: keep building past a failing target, so one broken unit does not hide the others' results
if cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_extra[@]}" > "$OUT/build.log" 2>&1 &&
   cmake --build "$B" -j "$jobs" "${targets[@]}" -- -k 0 >> "$OUT/build.log" 2>&1; then
  note "build: ok ($((SECONDS - T0)) s)"
else
  note "build: FAILED ($((SECONDS - T0)) s); what built is still run. First errors:"
  grep -E -A3 "error|FAILED" "$OUT/build.log" | head -40 | tee -a "$LOG"
fi

# ------------------------------------------------------------------------------------- tests and benchmarks
# Order: what this script exists for first (the whole-model GPU test, the benchmarks, the peers), then the
# other GPU tests and the CPU tests, so a call cut short at its time limit still brings back the first.
in_budget() {  # a step that would start past --budget seconds is skipped, and said so
  if ((budget > 0 && SECONDS >= budget)); then note "$1: skipped (past the --budget of $budget s)"; return 1; fi
}
ctest_summary() { grep -E "tests passed|No tests were found" "$1" | tail -1; }
: > "$OUT/tests-gpu.log"
if ((tests)) && in_budget test_gpu_model; then
  T0=$SECONDS
  # directly, so its measured errors are in the log even when it passes
  QKD_REQUIRE_GPU=1 timeout 180 "$B/bin/test_gpu_model" >> "$OUT/tests-gpu.log" 2>&1
  note "test_gpu_model: rc=$? $(grep -E "test cases:" "$OUT/tests-gpu.log" | tail -1) ($((SECONDS - T0)) s)"
  grep -h "MESSAGE: " "$OUT/tests-gpu.log" | grep -E "relative norm error|mean NLL" | sed 's/.*MESSAGE: /  /' |
    sort | uniq | head -30 | tee -a "$LOG"
fi

jsons=()
if ((bench)); then
  for spec in "llama2-7b int4" "llama2-7b bf16" "tinyllama-1.1b int4"; do
    read -r preset quant <<< "$spec"
    in_budget "qkd-bench $preset $quant" || continue
    f=$OUT/bench-$preset-$quant.json
    T0=$SECONDS
    timeout 150 "$B/bin/qkd-bench" --preset "$preset" --quant "$quant" --json > "$f" 2>> "$LOG"
    rc=$?
    note "qkd-bench $preset $quant: rc=$rc ($((SECONDS - T0)) s)"
    ((rc == 0)) && jsons+=("$f")
  done
  if ((peers)) && in_budget peers.py; then
    T0=$SECONDS
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/peers.py --json > "$OUT/peers.json" 2>> "$LOG"
    note "peers.py: rc=$? ($((SECONDS - T0)) s)"
  fi
fi

if ((tests)); then
  if in_budget "ctest -L gpu"; then
    T0=$SECONDS
    ctest --test-dir "$B" -L gpu -E '^test_gpu_model$' --output-on-failure --timeout 150 >> "$OUT/tests-gpu.log" 2>&1
    note "ctest -L gpu (the others): $(ctest_summary "$OUT/tests-gpu.log") ($((SECONDS - T0)) s)"
    grep -E "^ *[0-9]+/[0-9]+ Test.*(Failed|Timeout|Not Run|Exception)" "$OUT/tests-gpu.log" | tee -a "$LOG"
  fi
  if ((memcheck)) && in_budget memcheck; then
    T0=$SECONDS
    timeout 240 compute-sanitizer --tool memcheck --leak-check no "$B/bin/test_gpu_model" \
      -tc='*random preset*,*decode graph*' >> "$LOG" 2>&1
    note "memcheck test_gpu_model (random preset, decode graph): rc=$? $(grep 'ERROR SUMMARY' "$LOG" | tail -1) ($((SECONDS - T0)) s)"
  fi
  if ((sanitize)); then
    # the kernel tests under racecheck (shared-memory hazards), then every GPU test under memcheck (out-of-bounds
    # and misaligned accesses, API errors); --error-exitcode makes a report fail the line
    for t in test_gpu_ops test_gpu_attention test_gpu_int4_gemm test_gpu_int4_dequant test_gpu_sampling \
             test_gpu_backward test_gpu_train_ops; do
      in_budget "racecheck $t" || break
      T0=$SECONDS
      QKD_REQUIRE_GPU=1 timeout 60 compute-sanitizer --tool racecheck --error-exitcode 99 "$B/bin/$t" \
        > "$OUT/racecheck-$t.txt" 2>&1
      note "racecheck $t: rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck-$t.txt" | tail -1) ($((SECONDS - T0)) s)"
    done
    for t in $(ctest --test-dir "$B" -L gpu -N | sed -n 's/.*Test *#[0-9]*: *\(test_gpu_[a-z0-9_]*\).*/\1/p'); do
      in_budget "memcheck $t" || break
      T0=$SECONDS
      QKD_REQUIRE_GPU=1 timeout 60 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
        "$B/bin/$t" > "$OUT/memcheck-$t.txt" 2>&1
      note "memcheck $t: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck-$t.txt" | tail -1) ($((SECONDS - T0)) s)"
    done
    # at most 8 files come back from a device call: the per-test logs go into one archive
    tar -C "$OUT" -czf "$OUT/sanitizers.tar.gz" $(cd "$OUT" && ls memcheck-*.txt racecheck-*.txt 2>/dev/null) &&
      rm -f "$OUT"/memcheck-*.txt "$OUT"/racecheck-*.txt
  fi
  if ((cpu_tests)) && in_budget "ctest (cpu)"; then
    T0=$SECONDS
    # 8 tests at a time with 2 OpenMP threads each fill 16 cores without oversubscribing them
    OMP_NUM_THREADS=2 ctest --test-dir "$B" -LE gpu -j 8 --output-on-failure --timeout 240 > "$OUT/tests-cpu.log" 2>&1
    note "ctest (cpu): $(ctest_summary "$OUT/tests-cpu.log") ($((SECONDS - T0)) s)"
    grep -E "^ *[0-9]+/[0-9]+ Test.*(Failed|Timeout|Not Run|Exception)" "$OUT/tests-cpu.log" | tee -a "$LOG"
  fi
fi

# ----------------------------------------------------------------------- training-step benchmark (issue 5)
if ((train_bench)); then
  tq=$OUT/train-qkd.json tp=$OUT/train-peers.json
  if in_budget "qkd-bench --train"; then
    T0=$SECONDS
    timeout 240 "$B/bin/qkd-bench" --preset tinyllama-1.1b --train --batch 8 --seq-len 1024 --steps 10 --warmup 2 \
      --json > "$tq" 2>> "$LOG"
    note "qkd-bench --train: rc=$? ($((SECONDS - T0)) s)"
  fi
  if ((peers)) && in_budget train_peers.py; then
    T0=$SECONDS
    # --out is rewritten after each mode: a run cut short by the timeout still leaves eager's numbers
    PYTHONUNBUFFERED=1 timeout 360 python3 bench/train_peers.py --batch 8 --seq-len 1024 --steps 10 --warmup 2 \
      --out "$tp" > /dev/null 2>> "$LOG"
    note "train_peers.py: rc=$? ($((SECONDS - T0)) s)"
  fi
fi

# ---------------------------------------------------------------------------------------------- table
echo
if ((train_bench)); then
  peer_arg=()
  [ -s "$tp" ] && peer_arg=(--peers "$tp")
  python3 bench/compare_train.py "$tq" "${peer_arg[@]}" 2>&1 | tee -a "$LOG"
  echo
fi
if ((${#jsons[@]})); then
  peer_arg=()
  [ -s "$OUT/peers.json" ] && peer_arg=(--peers "$OUT/peers.json")
  python3 bench/compare.py "${jsons[@]}" "${peer_arg[@]}" 2>&1 | tee -a "$LOG"
  echo
fi
printf '%s\n' "${summary[@]}"
