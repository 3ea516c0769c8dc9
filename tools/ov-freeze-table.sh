#!/usr/bin/env bash
# The table of issue 6, run on the GPU machine with qkd's own tools: the bf16 teacher, RTN int4 (g128 symmetric,
# g128 asymmetric, per-channel symmetric), GPTQ int4 (the QAT start), and QAT-KD (qkd-train) with no freeze, with
# ov-freeze (o,v frozen), with q,k frozen as a control and with the freeze list qkd-analyze suggests, each over
# --seeds seeds, for int4 g128 and int3 g128.
# Every row is scored by qkd-eval against the teacher on a validation split made here (perplexity, KL to the
# teacher, top-1 agreement), and qkd-analyze's per-projection ranking is saved once. tools/ov-freeze-report.py
# turns the results into docs/ov-freeze.md and the plots.
#
#   tools/ov-freeze-table.sh [--bin DIR] [--teacher DIR] [--corpus FILE[,FILE...]] [--extra-train FILE|none]
#                            [--results DIR] [--work DIR] [--val-percent P] [--start gptq|rtn] [--seeds N]
#                            [--steps N] [--batch N] [--seq-len N] [--lr LR] [--eval-every N] [--train-args 'ARGS']
#                            [--no-int3] [--rows REGEX] [--retry-failed] [--budget S] [--deadline S] [--since EPOCH]
#                            [--run-timeout S] [--eval-timeout S] [--pack FILE] [--unpack FILE]
#                            [--keep-checkpoints] [--dry-run]
#
# The recipe (the defaults): the int4 students start from GPTQ (`qkd-quantize --group-size 128 --sym
# --clip-search --gptq train.txt`, calibrated on the training split; its row gptq-int4-g128-sym is scored too) through
# `qkd-train --init G --init-scales G`, so the frozen o,v layers keep GPTQ's codes bit for bit; the int3 students
# start from round to nearest (qkd-quantize writes int4 only). 2000 steps of 16 x 256 tokens at lr 3e-5, loss KL +
# 0.1 x cross-entropy (--train-args '--ce-weight 0.1'), on the training split plus --extra-train (default
# stories_lower.txt beside --corpus, less every document that holds the lowercased first 80 characters of a
# validation document; written to results/lower-train.txt). --start rtn --extra-train none --steps 500 --lr 1e-5
# --train-args '' is the first, shorter recipe (results/ov-freeze-short). The GPTQ checkpoint is made once per call
# that needs it (in --work) and must hash to the same sha256 each time (results/gptq-int4.sha256), so every seed
# starts from the same student.
#
# Sized for calls of 10 minutes: rows run in a fixed order (seed 0 of every method first), a row whose
# results/<row>.json exists is skipped, so the next call goes on where this one stopped. No row starts after
# --budget seconds (default 520), none that would end past --deadline (default 585, judged from the last row of
# its kind), and each command's timeout is cut to end by --deadline. The clock starts at --since EPOCH (the
# `date +%s` before the build, so that it counts too), else at this script's start. Killing the script at any
# point is safe: a row's JSON is written whole or not at all, and a run without its exported model is deleted
# and redone. A row that fails on its own (not cut by the deadline) leaves results/<row>.failed and is skipped
# until --retry-failed.
#
# Validation split: the last 5% of the documents (runs of non-blank lines, as qkd-eval splits them) of each
# --corpus file go to results/val.txt, the rest to results/train.txt; split.json records their sizes and sha256,
# and a later call checks that it rebuilt the same split. The int3 "RTN" row has no qkd-quantize path (it writes
# int4 only): it is qkd-train --bits 3 --steps 1 --lr 1e-12, whose one AdamW step is below fp32 resolution, so
# its export is the round-to-nearest init. The row rtn-int4-g128-sym-via-train (last in the order) checks that
# this equals qkd-quantize's RTN for int4.
#
# Written: results/<row>.json (qkd-eval's JSON plus the row's settings, a training summary, timings and the exact
# commands), results/metrics/<row>.jsonl (qkd-train's metrics, thinned), results/logs/, results/analyze.json,
# results/split.json, results/env.json (the GPU, driver, date and arguments of each call). After every row the
# small files (not train.txt, val.txt) are packed into --pack (default $OUT/ov-freeze-results.tar.gz when $OUT
# is set). Before the next call, unpack them into the results folder (which travels with the working tree), or
# carry the pack itself and name it with --unpack FILE: it is unpacked here first, keeping files already there.
# Bulky run folders (checkpoints, exported models) go to --work. Relative paths are taken from the repository's
# root. A results folder holds one configuration: settings.json records it, and a call with other settings (steps,
# batch, lr, ...) is refused rather than mixing them in one table.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
if [ -z "${QKD_SHARED_DATA:-}" ]; then
  if [ -d "$ROOT/.carry/shared/models" ]; then QKD_SHARED_DATA=$ROOT/.carry/shared; else QKD_SHARED_DATA=$ROOT/../shared/data; fi
fi

bin=build/bin
teacher=$QKD_SHARED_DATA/models/teacher-25m
corpus=$QKD_SHARED_DATA/corpora/tinystories/stories_cased.txt
extra_train=default
results=results/ov-freeze
work=/tmp/qkd-ov-freeze
start=gptq seeds=3 steps=2000 batch=16 seq_len=256 lr=3e-5 eval_every=500 train_args="--ce-weight 0.1"
int3=1 rows_re="" retry_failed=0 dry_run=0 keep_ckpt=0
budget=520 deadline=585 since="" run_timeout=240 eval_timeout=120 val_percent=5
pack=${OUT:+$OUT/ov-freeze-results.tar.gz} unpack=""
argv="$0 $*"
while (($#)); do
  case "$1" in
    --bin) bin="$2"; shift ;;
    --teacher) teacher="$2"; shift ;;
    --corpus) corpus="$2"; shift ;;
    --extra-train) extra_train="$2"; shift ;;
    --start) start="$2"; shift ;;
    --results) results="$2"; shift ;;
    --work) work="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --batch) batch="$2"; shift ;;
    --seq-len) seq_len="$2"; shift ;;
    --lr) lr="$2"; shift ;;
    --eval-every) eval_every="$2"; shift ;;
    --train-args) train_args="$2"; shift ;;
    --val-percent) val_percent="$2"; shift ;;
    --no-int3) int3=0 ;;
    --rows) rows_re="$2"; shift ;;
    --retry-failed) retry_failed=1 ;;
    --budget) budget="$2"; shift ;;
    --deadline) deadline="$2"; shift ;;
    --since) since="$2"; shift ;;
    --run-timeout) run_timeout="$2"; shift ;;
    --eval-timeout) eval_timeout="$2"; shift ;;
    --pack) pack="$2"; shift ;;
    --unpack) unpack="$2"; shift ;;
    --keep-checkpoints) keep_ckpt=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "ov-freeze-table: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for v in seeds steps batch seq_len eval_every budget deadline run_timeout eval_timeout; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "ov-freeze-table: --${v//_/-} '${!v}' is not a whole number" >&2; exit 2; }
done
((seeds >= 1 && steps >= 1)) || { echo "ov-freeze-table: --seeds and --steps must be at least 1" >&2; exit 2; }
[ -n "$since" ] || since=$(date +%s)
[ "$start" = gptq ] || [ "$start" = rtn ] || { echo "ov-freeze-table: --start '$start' is not gptq or rtn" >&2; exit 2; }
if [ "$extra_train" = default ]; then
  extra_train=$(dirname "${corpus%%,*}")/stories_lower.txt
  [ -f "$extra_train" ] || { echo "ov-freeze-table: the default --extra-train $extra_train is missing (give a file, or --extra-train none)" >&2; exit 2; }
fi
if [ "$extra_train" != none ] && [ ! -f "$extra_train" ]; then
  echo "ov-freeze-table: --extra-train $extra_train: no such file" >&2; exit 2
fi
[[ $since =~ ^[0-9]+$ ]] || { echo "ov-freeze-table: --since '$since' is not a Unix time" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------ the rows
# name|kind|bits|group|symmetry|freeze|seed. Seed 0 of every method comes first, so a table cut short still
# has each method once; the analysis follows it; the RTN-equivalence check of the int3 baseline is last.
rows=("teacher-bf16|teacher|16|-|-|-|-"
      "rtn-int4-g128-sym|rtn|4|128|sym|-|-"
      "rtn-int4-g128-asym|rtn|4|128|asym|-|-"
      "rtn-int4-channel-sym|rtn|4|channel|sym|-|-")
((int3)) && rows+=("rtn-int3-g128-sym|rtn-train|3|128|sym|none|0")
[ "$start" = gptq ] && rows+=("gptq-int4-g128-sym|gptq|4|128|sym|-|-")
bit_list=(4)
((int3)) && bit_list+=(3)
# The "sug" rows freeze what qkd-analyze suggests (freeze @analyze: read from results/analyze.json when the row
# starts), so the analysis's answer is tried in the same table; their seed 0 runs right after the analysis.
for ((s = 0; s < seeds; s++)); do
  for b in "${bit_list[@]}"; do
    for f in none o,v q,k; do
      rows+=("qat-int$b-g128-${f//,/}-s$s|qat|$b|128|sym|$f|$s")
    done
    ((s > 0)) && rows+=("qat-int$b-g128-sug-s$s|qat|$b|128|sym|@analyze|$s")
  done
  if ((s == 0)); then
    rows+=("analyze|analyze|4|128|sym|-|-")
    for b in "${bit_list[@]}"; do rows+=("qat-int$b-g128-sug-s0|qat|$b|128|sym|@analyze|0"); done
  fi
done
rows+=("rtn-int4-g128-sym-via-train|rtn-train|4|128|sym|none|0")

# Expected seconds of a row of each kind (train + eval), refined by each row that runs.
declare -A est=([teacher]=20 [rtn]=20 [rtn-train]=30 [gptq]=120 [qat]=40 [analyze]=60)
n_rows=${#rows[@]}
if ((dry_run)); then
  for ((i = 0; i < n_rows; i++)); do
    IFS='|' read -r name kind _ <<< "${rows[$i]}"
    state=todo
    [ -f "$results/$name.json" ] && state="done"
    [ -f "$results/$name.failed" ] && state="failed before"
    [ -n "$rows_re" ] && ! [[ $name =~ $rows_re ]] && state="left out by --rows"
    printf '%2d/%d %-32s %-9s %s\n' $((i + 1)) "$n_rows" "$name" "$kind" "$state"
  done
  exit 0
fi

for t in qkd-train qkd-eval qkd-quantize; do
  [ -x "$bin/$t" ] || { echo "ov-freeze-table: $bin/$t is missing (build it, or give --bin)" >&2; exit 1; }
done
[ -f "$teacher/config.json" ] || { echo "ov-freeze-table: no teacher at $teacher (give --teacher)" >&2; exit 1; }

mkdir -p "$results/metrics" "$results/logs" "$work"
if [ -n "$unpack" ]; then
  tar -xzf "$unpack" -C "$results" --skip-old-files || { echo "ov-freeze-table: cannot unpack $unpack" >&2; exit 1; }
fi
results=$(cd "$results" && pwd)
bin=$(cd "$bin" 2>/dev/null && pwd || echo "$bin")
LOG=${OUT:+$OUT/ov-freeze.log}
LOG=${LOG:-$results/logs/ov-freeze-table.log}
elapsed() { echo $(($(date +%s) - since)); }
say() { printf '[%4d s] %s\n' "$(elapsed)" "$*" | tee -a "$LOG"; }
# A command line as it can be pasted back into a shell, with paths inside the repository made relative to it.
quote() {
  local a out=""
  for a in "$@"; do
    a=${a//$ROOT\//}
    if [[ $a =~ ^[A-Za-z0-9_./,:=+@%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

# The settings every row shares; a results folder keeps one set.
python3 - "$results/settings.json" "$steps" "$batch" "$seq_len" "$lr" "$eval_every" "$train_args" \
  "$(basename "$teacher")" "$corpus" "$val_percent" "$start" "$extra_train" <<'EOF' || exit 1
import json, os, sys
path = sys.argv[1]
keys = ("steps", "batch", "seq_len", "lr", "eval_every", "train_args", "teacher", "corpus", "val_percent", "start",
        "extra_train")
vals = dict(zip(keys, sys.argv[2:]))
vals["corpus"] = ",".join(os.path.basename(c) for c in vals["corpus"].split(",") if c)
vals["extra_train"] = os.path.basename(vals["extra_train"])
if os.path.exists(path):
    old = json.load(open(path))
    old.setdefault("start", "rtn")  # folders made before these settings existed used RTN and no extra data
    old.setdefault("extra_train", "none")
    diff = [f"{k} {old.get(k)!r} there, {v!r} now" for k, v in vals.items() if old.get(k) != v]
    if diff:
        sys.exit(f"ov-freeze-table: {path} was made with other settings ({'; '.join(diff)}); give the same "
                 "settings, or a new --results folder")
else:
    with open(path + ".tmp", "w") as f:
        json.dump(vals, f, indent=1)
    os.replace(path + ".tmp", path)
EOF

# ------------------------------------------------------------------------------------------- the environment
# One entry per call, so the report can say on what and when each row ran.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
commit=$(git rev-parse HEAD 2>/dev/null || true)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)
python3 - "$results/env.json" "$gpu" "$driver" "$commit" "$dirty" "$argv" <<'EOF' || exit 1
import json, os, sys, datetime, platform
path, gpu, driver, commit, dirty, argv = sys.argv[1:]
env = json.load(open(path)) if os.path.exists(path) else {"calls": []}
env["calls"].append({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                     "gpu": gpu or "unknown (no nvidia-smi)", "driver": driver or None, "host": platform.node(),
                     "commit": commit or None, "modified_tracked_files": int(dirty), "argv": argv})
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(env, f, indent=1)
os.replace(tmp, path)
EOF
say "ov-freeze-table: gpu ${gpu:-none}, bin $bin, teacher $teacher, results $results, work $work"

# ------------------------------------------------------------------------------------------ validation split
train_txt=$results/train.txt val_txt=$results/val.txt
train_data=$train_txt
[ "$extra_train" != none ] && train_data=$train_txt,$results/lower-train.txt
python3 - "$results" "$val_percent" "$corpus" "$extra_train" <<'EOF' || exit 1
# Documents are runs of non-blank lines (a blank line holds only " \t\r\v\f"), as runtime/eval.cpp splits them;
# written back joined by one blank line, qkd-eval and qkd-train split them into the same documents.
import bisect, hashlib, json, os, sys
out, percent, corpus = sys.argv[1], float(sys.argv[2]), [c for c in sys.argv[3].split(",") if c]
extra = sys.argv[4]

def documents(text):
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip(" \t\r\v\f") == "":
            if cur:
                docs.append("\n".join(cur).strip("\r\n"))
                cur = []
        else:
            cur.append(line)
    if cur:
        docs.append("\n".join(cur).strip("\r\n"))
    return docs

train, val, files = [], [], []
for path in corpus:
    docs = documents(open(path, encoding="utf-8", newline="").read())
    n_val = max(1, round(len(docs) * percent / 100.0))
    train += docs[:-n_val]
    val += docs[-n_val:]
    files.append({"file": os.path.basename(path), "documents": len(docs), "val_documents": n_val})
split = {"rule": f"the last {percent:g}% of the documents of each file (blank-line separated) are validation",
         "files": files}
outputs = [("train", train), ("val", val)]
if extra != "none":
    # The extra training corpus (the lowercased TinyStories) holds the validation stories too, lowercased: drop
    # every document in which the lowercased, space-normalised first 80 characters of a validation document occur.
    norm = lambda d: " ".join(d.lower().split())
    ex = documents(open(extra, encoding="utf-8", newline="").read())
    normed = [norm(d) for d in ex]
    big, starts, pos = "\x00".join(normed), [], 0
    for d in normed:
        starts.append(pos)
        pos += len(d) + 1
    bad = set()
    for key in (norm(d)[:80] for d in val):
        i = big.find(key)
        while i >= 0:
            bad.add(bisect.bisect_right(starts, i) - 1)
            i = big.find(key, i + 1)
    kept = [d for i, d in enumerate(ex) if i not in bad]
    outputs.append(("lower-train", kept))
    split["extra"] = {"file": os.path.basename(extra), "documents": len(ex), "kept": len(kept),
                      "dropped_matching_validation": len(ex) - len(kept),
                      "note": "qkd-train --data train.txt,lower-train.txt"}
for name, docs in outputs:
    data = ("\n\n".join(docs) + "\n").encode("utf-8")
    split[name] = {"documents": len(docs), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tmp = os.path.join(out, name + ".txt.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out, name + ".txt"))
path = os.path.join(out, "split.json")
if os.path.exists(path):
    old = json.load(open(path))
    for name in [n for n, _ in outputs]:
        if name not in old or old[name]["sha256"] != split[name]["sha256"]:
            sys.exit(f"ov-freeze-table: {name}.txt differs from the split the earlier rows used ({path}); "
                     "give the same --corpus and --val-percent, or start a new --results folder")
else:
    with open(path + ".tmp", "w") as f:
        json.dump(split, f, indent=1)
    os.replace(path + ".tmp", path)
print(f"split: {split['train']['documents']} train / {split['val']['documents']} validation documents "
      f"({split['val']['bytes']} bytes of validation text)")
EOF

pack_results() {  # the small files, for the device tool to bring back; written whole or not at all
  [ -n "$pack" ] || return 0
  tar -czf "$pack.tmp" -C "$results" --exclude=./train.txt --exclude=./val.txt --exclude=./lower-train.txt \
    --exclude='*.tmp' . 2>> "$LOG" &&
    mv -f "$pack.tmp" "$pack"
}

# Seconds left before the deadline, capped at $1.
cap() { local left=$((deadline - $(elapsed))); ((left < $1)) && echo "$left" || echo "$1"; }

# run_step TIMEOUT LOG STDOUT CMD...: runs CMD under a timeout, its stderr (and its stdout when STDOUT is -) to
# LOG; sets step_rc, and step_cut to 1 when the timeout that stopped it was the deadline's rather than TIMEOUT.
step_rc=0 step_cut=0
run_step() {
  local limit=$1 log=$2 stdout=$3 t
  shift 3
  [ "$stdout" = - ] && stdout=$log
  t=$(cap "$limit")
  step_cut=0
  ((t < limit)) && step_cut=1
  if ((t < 5)); then step_rc=124 step_cut=1; return; fi
  echo "\$ $(quote "$@")" >> "$log"
  timeout -k 10 "$t" "$@" >> "$stdout" 2>> "$log"
  step_rc=$?
  ((step_rc == 124 || step_rc == 137)) || step_cut=0
}

mark_failed() {  # row, what, log
  {
    echo "$2 (exit $step_rc, $(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
    tail -20 "$3"
  } > "$results/$1.failed"
  cp -f "$3" "$results/logs/$1.$(basename "$3")" 2>/dev/null
  say "  FAILED: $2 (exit $step_rc); see results/$1.failed"
}

# write_row ROW EVAL_JSON SETTINGS TRAIN_DIR|- T_TRAIN T_EVAL CMD...: results/ROW.json, atomically.
write_row() {
  local row=$1 ev=$2 settings=$3 rundir=$4 t_train=$5 t_eval=$6
  shift 6
  local cmds=() c
  for c in "$@"; do cmds+=("$c"); done
  python3 - "$results" "$row" "$ev" "$settings" "$rundir" "$t_train" "$t_eval" "${cmds[@]}" <<'EOF'
import json, os, statistics, sys
results, row, ev_path, settings, rundir, t_train, t_eval = sys.argv[1:8]
commands = sys.argv[8:]
lines = [l for l in open(ev_path).read().splitlines() if l.strip().startswith("{")]
if not lines:
    sys.exit(f"{ev_path}: qkd-eval printed no JSON")
j = json.loads(lines[-1])
j["row"] = row
def value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v
j["settings"] = {k: value(v) for k, _, v in (l.partition("=") for l in settings.splitlines() if l)}
j["timing_s"] = {"train": float(t_train) if t_train != "-" else None, "eval": float(t_eval)}
j["commands"] = commands
if rundir != "-":
    # qkd-train's metrics, thinned to what the report needs (they travel back and forth with the results): the
    # training loss (= KL, the only loss term here) and gradient norm at 5 significant digits, the validation lines.
    train, val = [], []
    for l in open(os.path.join(rundir, "metrics.jsonl")):
        m = json.loads(l)
        if m.get("type") == "train" and not m.get("skipped"):
            train.append(m)
        elif m.get("type") == "val":
            val.append(m)
    r = lambda x: float(f"{x:.5g}") if isinstance(x, float) else x
    with open(os.path.join(results, "metrics", row + ".jsonl.tmp"), "w") as f:
        for m in train:
            keep = ("type", "step", "loss", "grad_norm") + (() if m.get("kl") == m.get("loss") else ("kl", "ce"))
            f.write(json.dumps({k: r(m[k]) for k in keep if k in m}, separators=(",", ":")) + "\n")
        for m in val:
            f.write(json.dumps({k: r(v) for k, v in m.items()}, separators=(",", ":")) + "\n")
    os.replace(os.path.join(results, "metrics", row + ".jsonl.tmp"), os.path.join(results, "metrics", row + ".jsonl"))
    tps = [m["tokens_per_s"] for m in train if "tokens_per_s" in m]
    tail = [m["loss"] for m in train[-20:]]
    j["train"] = {"steps_done": train[-1]["step"] if train else 0,
                  "first_loss": train[0]["loss"] if train else None,
                  "last20_loss": statistics.fmean(tail) if tail else None,
                  "median_tokens_per_s": statistics.median(tps) if tps else None,
                  "loop_seconds": train[-1].get("elapsed_s") if train else None,
                  "val": [{k: m[k] for k in ("step", "ppl", "kl") if k in m} for m in val]}
tmp = os.path.join(results, row + ".json.tmp")
with open(tmp, "w") as f:
    json.dump(j, f, indent=1)
os.replace(tmp, os.path.join(results, row + ".json"))
print(f"ppl {j['perplexity']:.4f}  kl {j.get('kl_to_teacher', 0):.5f}  top1 {j.get('top1_agreement', 1):.4f}")
EOF
}

# qkd-analyze's suggested --freeze list from results/analyze.json; empty when there is none yet.
suggested_freeze() {
  python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('suggested_freeze') or '')" \
    "$results/analyze.json" 2>/dev/null
}

# A row's settings as KEY=VALUE lines; write_row reads each VALUE as JSON where it is JSON, else as a string.
settings_of() {  # kind bits group sym freeze seed freeze_from
  local kind=$1 bits=$2 group=$3 sym=$4 freeze=$5 seed=$6 freeze_from=$7
  local method=$kind
  case "$kind" in
    rtn) echo "rtn_via=qkd-quantize" ;;
    rtn-train) method=rtn; echo "rtn_via=qkd-train --steps 1 --lr 1e-12 (an update below fp32 resolution)" ;;
    gptq) echo "gptq_via=qkd-quantize --clip-search --gptq train.txt" ;;
    qat) method=qat-kd ;;
  esac
  echo "method=$method"
  echo "bits=$bits"
  case "$group" in 128) echo "group_size=128" ;; channel) echo "group_size=0" ;; *) echo "group_size=null" ;; esac
  case "$sym" in sym) echo "symmetric=true" ;; asym) echo "symmetric=false" ;; *) echo "symmetric=null" ;; esac
  [ "$freeze" = - ] && echo "freeze=null" || echo "freeze=$freeze"
  [ -n "$freeze_from" ] && echo "freeze_from=$freeze_from"
  [ "$seed" = - ] && echo "seed=null" || echo "seed=$seed"
  if [ "$kind" = qat ]; then
    printf '%s\n' "steps=$steps" "batch=$batch" "seq_len=$seq_len" "lr=$lr" "eval_every=$eval_every" \
      "train_args=$train_args"
    # where the student starts: GPTQ's checkpoint (int4 with --start gptq) or round to nearest
    if [ "$start" = gptq ] && [ "$bits" = 4 ]; then echo "start=gptq"; else echo "start=rtn"; fi
    if [ "$extra_train" != none ]; then echo "train_data=train.txt,lower-train.txt"; else echo "train_data=train.txt"; fi
  fi
  echo "eval_ctx=$seq_len"
  echo "teacher=$(basename "$teacher")"
}

# ---- the GPTQ start: made once per call that needs it; its sha256 must match the first call's.
gptq_dir=$work/gptq/int4-g128-sym
gptq_cmd=("$bin/qkd-quantize" -m "$teacher" -o "$gptq_dir" --group-size 128 --sym --clip-search --gptq "$train_txt"
          --force)
gptq_t=-
ensure_gptq() {  # sets step_rc (0: ready), step_cut; the log is $work/gptq/quantize.log
  mkdir -p "$work/gptq"
  local glog=$work/gptq/quantize.log sha want t0
  if [ ! -f "$gptq_dir/model.safetensors" ]; then
    : > "$glog"
    t0=$(elapsed)
    run_step "$run_timeout" "$glog" - "${gptq_cmd[@]}"
    gptq_t=$(($(elapsed) - t0))
    ((step_rc == 0)) || { rm -rf "$gptq_dir"; return; }
    say "  GPTQ start made in ${gptq_t} s"
  fi
  sha=$(cat "$gptq_dir"/*.safetensors | sha256sum | cut -d' ' -f1)
  if [ -f "$results/gptq-int4.sha256" ]; then
    want=$(cat "$results/gptq-int4.sha256")
    if [ "$sha" != "$want" ]; then
      echo "the GPTQ start hashes to $sha, the earlier calls' to $want: the seeds would not share a start" >> "$glog"
      step_rc=1 step_cut=0
      return
    fi
  else
    echo "$sha" > "$results/gptq-int4.sha256"
  fi
  step_rc=0
}

# ------------------------------------------------------------------------------------------------- the loop
done_rows=0 ran=0 failed=0 stopped_at=""
for ((i = 0; i < n_rows; i++)); do
  IFS='|' read -r name kind bits group sym freeze seed <<< "${rows[$i]}"
  tag="$((i + 1))/$n_rows $name"
  [ -n "$rows_re" ] && ! [[ $name =~ $rows_re ]] && continue
  if [ -f "$results/$name.json" ]; then done_rows=$((done_rows + 1)); continue; fi
  if [ -f "$results/$name.failed" ] && ((retry_failed == 0)); then
    say "$tag: skipped, failed before (results/$name.failed; --retry-failed runs it again)"
    failed=$((failed + 1))
    continue
  fi
  now=$(elapsed)
  if ((now >= budget || now + ${est[$kind]} > deadline)); then
    stopped_at=$name
    say "$tag: not started: ${now} s gone of --budget $budget / --deadline $deadline (a row of this kind takes ~${est[$kind]} s)"
    break
  fi
  freeze_from=""
  if [ "$freeze" = @analyze ]; then
    freeze=$(suggested_freeze)
    if [ -z "$freeze" ]; then
      say "$tag: waits for qkd-analyze's suggested freeze (no $results/analyze.json yet)"
      continue
    fi
    freeze_from=qkd-analyze
  fi
  t_row=$(elapsed)
  note=""
  [ -n "$freeze_from" ] && note=" (freeze $freeze, suggested by qkd-analyze)"
  say "$tag: start$note"
  rm -f "$results/$name.failed"

  if [ "$kind" = analyze ]; then
    if [ ! -x "$bin/qkd-analyze" ]; then
      say "  qkd-analyze is not in $bin: no per-projection ranking this call"
      continue
    fi
    alog=$work/analyze.log
    : > "$alog"
    : > "$work/analyze.out"
    cmd=("$bin/qkd-analyze" --teacher "$teacher" --data "$val_txt" --backend cuda --bits "$bits" --group-size "$group"
         --seq-len "$seq_len" --json)
    run_step "$eval_timeout" "$alog" "$work/analyze.out" "${cmd[@]}"
    if ((step_rc == 0)) && python3 -c "
import json, sys
j = json.loads(open(sys.argv[1]).read())
j['command'] = sys.argv[2]
json.dump(j, open(sys.argv[3], 'w'), indent=1)
" "$work/analyze.out" "$(quote "${cmd[@]}")" "$results/analyze.json.tmp" 2>> "$alog"; then
      mv -f "$results/analyze.json.tmp" "$results/analyze.json"
      cp -f "$alog" "$results/logs/analyze.log"
      say "  analyze: suggested freeze $(suggested_freeze)"
    elif ((step_cut)); then
      stopped_at=$name; say "  cut by the deadline; redone next call"; break
    else
      mark_failed analyze "qkd-analyze" "$alog"; failed=$((failed + 1))
    fi
    est[$kind]=$(($(elapsed) - t_row + 5))
    ran=$((ran + 1))
    pack_results
    continue
  fi

  # ---- the model to score: the teacher itself, an RTN checkpoint, or a qkd-train export
  rundir=- t_train=- cmds=()
  model=$teacher
  if [ "$kind" = rtn ]; then
    model=$work/rtn/$name
    qcmd=("$bin/qkd-quantize" -m "$teacher" -o "$model" --group-size "$group" "--$sym" --force)
    cmds+=("$(quote "${qcmd[@]}")")
    mkdir -p "$work/rtn"
    qlog=$work/rtn/$name.log
    : > "$qlog"
    t0=$(elapsed)
    run_step "$run_timeout" "$qlog" - "${qcmd[@]}"
    t_train=$(($(elapsed) - t0))
    if ((step_rc != 0)); then
      if ((step_cut)); then stopped_at=$name; say "  cut by the deadline; redone next call"; break; fi
      mark_failed "$name" "qkd-quantize" "$qlog"; failed=$((failed + 1)); pack_results; continue
    fi
    cp -f "$qlog" "$results/logs/$name.quantize.log"
  elif [ "$kind" = gptq ]; then
    model=$gptq_dir
    cmds+=("$(quote "${gptq_cmd[@]}")")
    ensure_gptq
    t_train=$gptq_t
    if ((step_rc != 0)); then
      if ((step_cut)); then stopped_at=$name; say "  cut by the deadline; redone next call"; break; fi
      mark_failed "$name" "qkd-quantize --gptq" "$work/gptq/quantize.log"; failed=$((failed + 1)); pack_results; continue
    fi
    cp -f "$work/gptq/quantize.log" "$results/logs/$name.quantize.log"
  elif [ "$kind" = qat ] || [ "$kind" = rtn-train ]; then
    rundir=$work/runs/$name
    model=$rundir/model
    r_steps=$steps r_lr=$lr r_eval_every=$eval_every extra=()
    r_data=$train_txt
    if [ "$kind" = rtn-train ]; then
      r_steps=1 r_lr=1e-12 r_eval_every=0
    else
      r_data=$train_data
      # shellcheck disable=SC2206  # --train-args is split into words on purpose
      extra=($train_args)
      if [ "$start" = gptq ] && [ "$bits" = 4 ]; then
        extra+=(--init "$gptq_dir" --init-scales "$gptq_dir")
        if [ ! -d "$model" ]; then
          ensure_gptq
          if ((step_rc != 0)); then
            if ((step_cut)); then stopped_at=$name; say "  cut by the deadline; redone next call"; break; fi
            mark_failed "$name" "qkd-quantize --gptq (the start)" "$work/gptq/quantize.log"; failed=$((failed + 1))
            pack_results; continue
          fi
        fi
      fi
    fi
    tcmd=("$bin/qkd-train" --teacher "$teacher" --data "$r_data" --val-data "$val_txt" --out "$rundir"
          --backend cuda --bits "$bits" --group-size "$group" --freeze "$freeze" --seed "$seed" --steps "$r_steps"
          --seq-len "$seq_len" --batch "$batch" --lr "$r_lr" --eval-every "$r_eval_every" --save-every 0
          --no-progress "${extra[@]}")
    cmds+=("$(quote "${tcmd[@]}")")
    if [ -d "$model" ] && [ -f "$rundir/metrics.jsonl" ]; then
      say "  the trained model is there from an earlier call: scoring it"
    else
      rm -rf "$rundir"  # half a run (killed before its export) is redone from the start
      mkdir -p "$rundir"
      t0=$(elapsed)
      run_step "$run_timeout" "$rundir/train.log" - "${tcmd[@]}"
      t_train=$(($(elapsed) - t0))
      if ((step_rc != 0)) || [ ! -d "$model" ]; then
        if ((step_cut)); then rm -rf "$rundir"; stopped_at=$name; say "  cut by the deadline; redone next call"; break; fi
        mark_failed "$name" "qkd-train" "$rundir/train.log"; failed=$((failed + 1)); rm -rf "$rundir/checkpoint"
        pack_results; continue
      fi
      say "  trained in ${t_train} s: $(grep -E 'validation' "$rundir/train.log" | tail -1 | sed 's/^qkd-train: //')"
    fi
    cp -f "$rundir/train.log" "$results/logs/$name.train.log" 2>/dev/null
  fi

  # ---- score it against the teacher
  ecmd=("$bin/qkd-eval" -m "$model" --teacher "$teacher" --text "$val_txt" -c "$seq_len" --backend cuda --json)
  cmds+=("$(quote "${ecmd[@]}")")
  edir=$work/eval/$name
  rm -rf "$edir"
  mkdir -p "$edir"
  : > "$edir/eval.log"
  t0=$(elapsed)
  run_step "$eval_timeout" "$edir/eval.log" "$edir/eval.json" "${ecmd[@]}"
  t_eval=$(($(elapsed) - t0))
  if ((step_rc != 0)); then
    if ((step_cut)); then stopped_at=$name; say "  scoring cut by the deadline; redone next call"; break; fi
    mark_failed "$name" "qkd-eval" "$edir/eval.log"; failed=$((failed + 1)); pack_results; continue
  fi
  tr '\r' '\n' < "$edir/eval.log" | grep -v 'window [0-9]' > "$results/logs/$name.eval.log"
  if ! line=$(write_row "$name" "$edir/eval.json" \
      "$(settings_of "$kind" "$bits" "$group" "$sym" "$freeze" "$seed" "$freeze_from")" "$rundir" "$t_train" "$t_eval" "${cmds[@]}" \
      2>> "$edir/eval.log"); then
    step_rc=1; mark_failed "$name" "reading qkd-eval's JSON" "$edir/eval.log"; failed=$((failed + 1)); continue
  fi
  ((keep_ckpt)) || [ "$rundir" = - ] || rm -rf "$rundir/checkpoint"  # the AdamW state: large, not needed now
  ran=$((ran + 1)) done_rows=$((done_rows + 1))
  est[$kind]=$(($(elapsed) - t_row + 5))
  say "  done in $(($(elapsed) - t_row)) s (train ${t_train} s, eval ${t_eval} s): $line"
  pack_results
done

todo=0 failed_all=0
for r in "${rows[@]}"; do
  n=${r%%|*}
  [ -n "$rows_re" ] && ! [[ $n =~ $rows_re ]] && continue
  [ "$n" = analyze ] && [ ! -x "$bin/qkd-analyze" ] && continue
  [ -f "$results/$n.json" ] && continue
  if [ -f "$results/$n.failed" ] && ((retry_failed == 0)); then failed_all=$((failed_all + 1)); else todo=$((todo + 1)); fi
done
say "this call: $ran rows run, $failed failed; $done_rows done in all, $todo still to run, $failed_all failed${stopped_at:+ (next: $stopped_at)}"
# A preview of the report (with plots where matplotlib is installed) travels back in the pack.
timeout 60 python3 "$ROOT/tools/ov-freeze-report.py" --results "$results" --docs "$results/preview" --print 2>&1 |
  tee -a "$LOG"
pack_results
if ((todo > 0)); then
  say "call again to go on"
elif ((failed_all > 0)); then
  say "every row has run, $failed_all failed (results/*.failed): fix them, then call again with --retry-failed"
else
  say "the table is complete"
fi
exit 0
