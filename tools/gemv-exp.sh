#!/usr/bin/env bash
# One device call for the int4 decode GEMV (docs/int4-gemm-notes.md): build, test, benchmark, profile.
# Run on the GPU machine from the repository root, with .carry/deps carried:
#   . .carry/deps/env.sh; bash tools/gemv-exp.sh
# Writes its logs to $OUT (or /tmp/gemv-out) and prints a short table last.
# QKD_GEMV is the variant switch an experimental kernels/int4_gemm.cu reads (the stream-kernel experiment of
# 2026-12-04 had one: old, w8s4 = default, w16s4, w8s8); the committed file has none, so only "default" differs.
#   GEMV_CONFIGS   QKD_GEMV values to benchmark (decode sections only); "default" leaves it unset
#   GEMV_NCU       QKD_GEMV values to profile with Nsight Compute (--set full, m = 1 and 16, one launch a shape)
#   GEMV_TEST_CONFIGS  QKD_GEMV values to run the GPU tests under (default: the dispatched default)
#   GEMV_PREFILL   1: also run the bench's prefill section once (the GEMM path, unchanged by the GEMV work)
set -uo pipefail
OUT=${OUT:-/tmp/gemv-out}
mkdir -p "$OUT"
BUILD=/tmp/gemv-build
CONFIGS=${GEMV_CONFIGS-default}
NCU_CONFIGS=${GEMV_NCU-}
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/build.log"
stamp configure
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
stamp build
cmake --build "$BUILD" --target int4_gemv_bench test_gpu_int4_gemm -j16 >>"$OUT/build.log" 2>&1 ||
  { grep -B2 -A12 "error" "$OUT/build.log" | head -60; exit 1; }

: >"$OUT/test.log"
for c in ${GEMV_TEST_CONFIGS:-default}; do
  [ "$c" = default ] && v= || v=$c
  stamp "tests $c"
  echo "### tests $c" >>"$OUT/test.log"
  QKD_GEMV=$v timeout 100 "$BUILD/bin/test_gpu_int4_gemm" >>"$OUT/test.log" 2>&1
  echo "test exit $?" >>"$OUT/test.log"
  tail -4 "$OUT/test.log"
done

: >"$OUT/bench.txt"
for c in $CONFIGS; do
  [ "$c" = default ] && v= || v=$c
  stamp "bench $c"
  echo "### config $c" >>"$OUT/bench.txt"
  QKD_GEMV=$v timeout 60 "$BUILD/bin/int4_gemv_bench" --no-prefill >>"$OUT/bench.txt" 2>&1
done
if [ "${GEMV_PREFILL:-0}" = 1 ]; then
  stamp "bench default with prefill"
  echo "### config default+prefill" >>"$OUT/bench.txt"
  timeout 90 "$BUILD/bin/int4_gemv_bench" >>"$OUT/bench.txt" 2>&1
fi

for c in $NCU_CONFIGS; do
  [ "$c" = default ] && v= || v=$c
  stamp "ncu $c"
  QKD_GEMV=$v timeout 90 ncu --clock-control none --set full -k regex:int4_gemv --launch-count 8 \
    -o "$OUT/ncu_$c" "$BUILD/bin/int4_gemv_bench" --profile >"$OUT/ncu_$c.log" 2>&1
  ncu --import "$OUT/ncu_$c.ncu-rep" --print-units base --csv --page raw \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread \
    >"$OUT/ncu_${c}_key.csv" 2>&1
  ncu --import "$OUT/ncu_$c.ncu-rep" >"$OUT/ncu_$c.txt" 2>&1
  rm -f "$OUT/ncu_$c.ncu-rep" "$OUT/ncu_$c.log"
done

stamp done
echo "== chain (m = 1, 128 launches) and per matrix: us / % of copy =="
awk '/^### config/{c=$3} /^copy:/{cp=$(NF-1)} /^7B decode/{printf "%-16s chain %s ms  %s GB/s  %s of copy (%s GB/s)\n", c, $8, $12, $15, cp}
     /^(qkv|o|gate_up|down) /{printf "%-16s %-8s m=%-3s %8s us %7s\n", c, $1, $2, $3, $5}' "$OUT/bench.txt"
for c in $NCU_CONFIGS; do
  echo "== ncu $c: kernel, duration ns, dram % peak, warps active %, stalls per issue (long_sb barrier math mio lg wait short_sb), issue % =="
  python3 - "$OUT/ncu_${c}_key.csv" <<'EOF'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = [i for i, r in enumerate(rows) if r and r[0] == "ID"]
if not hdr:
    print(open(sys.argv[1]).read()[-2000:]); sys.exit()
h = rows[hdr[0]]
col = {name: h.index(name) for name in h}
def g(r, m):
    try: return r[col[m]]
    except Exception: return "?"
for r in rows[hdr[0] + 2:]:
    if len(r) < len(h): continue
    name = g(r, "Kernel Name")[:48]
    st = [g(r, "smsp__average_warps_issue_stalled_%s_per_issue_active.ratio" % s)[:5] for s in
          ("long_scoreboard", "barrier", "math_pipe_throttle", "mio_throttle", "lg_throttle", "wait", "short_scoreboard")]
    print(name, g(r, "launch__grid_size"), g(r, "gpu__time_duration.sum"),
          g(r, "dram__throughput.avg.pct_of_peak_sustained_elapsed")[:5],
          g(r, "sm__warps_active.avg.pct_of_peak_sustained_active")[:5], " ".join(st),
          g(r, "smsp__issue_active.avg.pct_of_peak_sustained_active")[:5])
EOF
done
