#!/usr/bin/env bash
# A recipe sweep for issue 6 on the GPU machine: many qkd-train configurations of the int4 g128 student of
# teacher-25m, each scored by qkd-eval --teacher on the same validation split as tools/ov-freeze-table.sh, several
# runs at a time on one GPU, in a fixed priority order under a deadline, and optionally the best one again over
# three seeds, with ov-freeze and with no freeze (--confirm-after). tools/ov-freeze-table.sh --train-args '...'
# runs a chosen recipe as a table of its own.
#
#   tools/ov-freeze-sweep.sh --configs FILE [--bin DIR] [--teacher DIR] [--corpus FILE] [--extra-corpus FILE]
#                            [--results DIR] [--work DIR] [--jobs N] [--since EPOCH] [--deadline S]
#                            [--confirm-after S] [--confirm-seeds N] [--pack FILE]
#   tools/ov-freeze-sweep.sh --to-table NAME --results SWEEP_DIR --base TABLE_DIR --table-results DIR
#
# --configs: one configuration a line, `name|freeze|seed|data|qkd-train flags` (# starts a comment). freeze is
# qkd-train's --freeze (o,v; none); data is `cased` (results/train.txt, the table's training split) or
# `cased+lower` (that plus the documents of --extra-corpus, stories_lower.txt, less every document that holds the
# lowercased first 80 characters of a validation document: written to WORK/lower-train.txt). Every run is
#   qkd-train --teacher T --data D --val-data VAL --out WORK/runs/NAME --backend cuda --bits 4 --group-size 128
#             --freeze F --seed S --seq-len 256 --save-every 0 --no-progress FLAGS
# then qkd-eval -m WORK/runs/NAME/model --teacher T --text VAL -c 256 --backend cuda --json. A configuration
# whose results/NAME.json exists is skipped. Up to --jobs (default 3) run at once; none starts after --deadline
# seconds (default 330) minus the time it is expected to take (the same flags' measured time, else the
# --steps/--batch scaled time of the first finished run), and each is killed at the deadline.
# --confirm-after S: from S seconds on, the best finished configuration (lowest perplexity) among the ov-freeze
# seed-0 ones whose seeds can still end before the deadline (twice its measured time) is queued again for seeds
# 1..N-1 (--confirm-seeds, default 3) and with --freeze none for seeds 0..N-1, ahead of what is left of the list
# (rows NAME-ov-sK, NAME-none-sK). The runs share the GPU by time slicing: their tokens/s are per run, not alone.
#
# --to-table NAME (run here, no GPU): the seeds of configuration NAME (NAME, NAME-ov-sK, NAME-none-sK, NAME-qk-sK
# for q,k frozen) become rows qat-int4-g128-{ov,none,qk}-sK of a tools/ov-freeze-table.sh results folder (the same
# JSON fields, settings, thinned metrics and exact commands), joined with the teacher and RTN rows of --base (an ov-freeze-table.sh folder of the
# same split, made on the same GPU), so that tools/ov-freeze-report.py reports them; write a HOW.md there by hand.
#
# Written: results/NAME.json (qkd-eval's JSON, the configuration, the exact commands, timings, the validation
# trajectory), results/metrics/NAME.jsonl (validation lines and every 20th training step), results/split.json,
# results/sweep.log; all packed into --pack (default $OUT/ov-freeze-sweep.tar.gz) after each run.
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
if [ -z "${QKD_SHARED_DATA:-}" ]; then
  QKD_SHARED_DATA=$ROOT/../shared/data
  [ -d "$ROOT/.carry/shared/models" ] && QKD_SHARED_DATA=$ROOT/.carry/shared
fi
bin=build/bin configs="" results=results/ov-freeze-sweep work=/tmp/qkd-ov-sweep jobs=3 since="" deadline=330
teacher=$QKD_SHARED_DATA/models/teacher-25m
corpus=$QKD_SHARED_DATA/corpora/tinystories/stories_cased.txt
extra=$QKD_SHARED_DATA/corpora/tinystories/stories_lower.txt
confirm_after=0 confirm_seeds=3 pack=${OUT:+$OUT/ov-freeze-sweep.tar.gz} to_table="" base="" table_results=""
while (($#)); do
  case "$1" in
    --configs) configs="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    --teacher) teacher="$2"; shift ;;
    --corpus) corpus="$2"; shift ;;
    --extra-corpus) extra="$2"; shift ;;
    --results) results="$2"; shift ;;
    --work) work="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --since) since="$2"; shift ;;
    --deadline) deadline="$2"; shift ;;
    --confirm-after) confirm_after="$2"; shift ;;
    --confirm-seeds) confirm_seeds="$2"; shift ;;
    --pack) pack="$2"; shift ;;
    --to-table) to_table="$2"; shift ;;
    --base) base="$2"; shift ;;
    --table-results) table_results="$2"; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "ov-freeze-sweep: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$to_table" ]; then
  [ -d "$base" ] && [ -n "$table_results" ] ||
    { echo "ov-freeze-sweep: --to-table needs --base DIR and --table-results DIR" >&2; exit 2; }
  exec python3 - "$results" "$to_table" "$base" "$table_results" <<'EOF'
import glob, json, os, re, shlex, shutil, sys
sweep, name, base, out = sys.argv[1:]
os.makedirs(os.path.join(out, "metrics"), exist_ok=True)
os.makedirs(os.path.join(out, "logs"), exist_ok=True)
for f in ("teacher-bf16", "rtn-int4-g128-sym"):  # the baselines, as ov-freeze-table.sh wrote them
    shutil.copy(os.path.join(base, f + ".json"), out)
    for lg in glob.glob(os.path.join(base, "logs", f + ".*")):
        shutil.copy(lg, os.path.join(out, "logs"))
env = json.load(open(os.path.join(base, "env.json")))
split = json.load(open(os.path.join(base, "split.json")))
sw_split = json.load(open(os.path.join(sweep, "split.json")))
assert sw_split["val"]["sha256"] == split["val"]["sha256"], "the sweep's validation split differs from --base's"
if "extra" in sw_split:
    split["extra"] = dict(sw_split["extra"], note="qkd-train --data train.txt,lower-train.txt")
json.dump(split, open(os.path.join(out, "split.json"), "w"), indent=1)
rows, settings = [], None
for path in sorted(glob.glob(os.path.join(sweep, name + "*.json"))):
    j = json.load(open(path))
    c = j["config"]
    if not (j["row"] == name or re.fullmatch(re.escape(name) + r"-(ov|none|qk)-s\d+", j["row"])):
        continue
    flags = shlex.split(c["flags"])
    val = lambda k, d: flags[flags.index(k) + 1] if k in flags else d
    rest, i = [], 0
    while i < len(flags):  # the flags the table's own settings do not hold
        if flags[i] in ("--steps", "--batch", "--lr", "--eval-every"):
            i += 2
            continue
        rest.append(flags[i]); i += 1
    train_args = " ".join(rest + (["--data", "train.txt,lower-train.txt"] if c["data"] == "cased+lower" else []))
    row = f"qat-int4-g128-{'ov' if c['freeze'] == 'o,v' else c['freeze'].replace(',', '')}-s{c['seed']}"
    s = {"method": "qat-kd", "bits": 4, "group_size": 128, "symmetric": True, "freeze": c["freeze"],
         "seed": c["seed"], "steps": int(val("--steps", 1000)), "batch": int(val("--batch", 8)), "seq_len": 256,
         "lr": float(val("--lr", 1e-5)), "eval_every": int(val("--eval-every", 100)), "train_args": train_args,
         "eval_ctx": 256, "teacher": "teacher-25m"}
    settings = s
    t = dict(j)
    for k in ("config", "gpu"):
        t.pop(k, None)
    t.update({"row": row, "settings": s, "sweep_row": j["row"]})
    json.dump(t, open(os.path.join(out, row + ".json"), "w"), indent=1)
    shutil.copy(os.path.join(sweep, "metrics", j["row"] + ".jsonl"), os.path.join(out, "metrics", row + ".jsonl"))
    rows.append(f"{j['row']} -> {row}")
if settings is None:
    sys.exit(f"ov-freeze-sweep: no row {name} in {sweep}")
json.dump({k: str(settings[k]) for k in ("steps", "batch", "seq_len", "lr", "eval_every", "train_args")} |
          {"teacher": "teacher-25m", "corpus": "stories_cased.txt", "val_percent": "5",
           "made_by": f"tools/ov-freeze-sweep.sh --to-table {name}"},
          open(os.path.join(out, "settings.json"), "w"), indent=1)
last = env["calls"][-1]
env["calls"].append(dict(last, argv=f"tools/ov-freeze-sweep.sh (the same call): the QAT-KD rows, {name}"))
json.dump(env, open(os.path.join(out, "env.json"), "w"), indent=1)
print("\n".join(rows))
EOF
fi
[ -n "$configs" ] && [ -f "$configs" ] || { echo "ov-freeze-sweep: --configs FILE is required" >&2; exit 2; }
[ -n "$since" ] || since=$(date +%s)
mkdir -p "$results/metrics" "$work"
exec python3 - "$ROOT" "$bin" "$teacher" "$corpus" "$extra" "$results" "$work" "$jobs" "$since" "$deadline" \
  "$confirm_after" "$confirm_seeds" "$pack" "$configs" <<'EOF'
import hashlib, json, os, shlex, statistics, subprocess, sys, tarfile, time
(root, bin_, teacher, corpus, extra, results, work, jobs, since, deadline, confirm_after, confirm_seeds, pack,
 configs) = sys.argv[1:]
backend = os.environ.get("QKD_SWEEP_BACKEND", "cuda")  # cpu: a quick check of this script without a GPU
jobs, since, deadline = int(jobs), int(since), float(deadline)
confirm_after, confirm_seeds = float(confirm_after), int(confirm_seeds)
results, work = os.path.abspath(results), os.path.abspath(work)
bin_ = os.path.abspath(bin_)
log_f = open(os.path.join(results, "sweep.log"), "a")

def elapsed():
    return time.time() - since

def say(msg):
    line = f"[{elapsed():4.0f} s] {msg}"
    print(line, flush=True)
    log_f.write(line + "\n"); log_f.flush()

def rel(s):
    return s.replace(root + "/", "")

# ---- the split, exactly as tools/ov-freeze-table.sh makes it (the last 5% of the documents are validation)
def documents(text):
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip(" \t\r\v\f") == "":
            if cur:
                docs.append("\n".join(cur).strip("\r\n")); cur = []
        else:
            cur.append(line)
    if cur:
        docs.append("\n".join(cur).strip("\r\n"))
    return docs

docs = documents(open(corpus, encoding="utf-8", newline="").read())
n_val = max(1, round(len(docs) * 5 / 100.0))
train, val = docs[:-n_val], docs[-n_val:]
split = {"rule": "the last 5% of the documents of each file (blank-line separated) are validation",
         "files": [{"file": os.path.basename(corpus), "documents": len(docs), "val_documents": n_val}]}
for name, d in (("train", train), ("val", val)):
    data = ("\n\n".join(d) + "\n").encode("utf-8")
    split[name] = {"documents": len(d), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(results, name + ".txt"), "wb") as f:
        f.write(data)
train_txt, val_txt = os.path.join(results, "train.txt"), os.path.join(results, "val.txt")
lower_txt = os.path.join(work, "lower-train.txt")
if os.path.exists(extra):
    norm = lambda s: " ".join(s.lower().split())
    val_keys = [norm(d)[:80] for d in val]  # a validation document's start anywhere in an extra document
    ex = documents(open(extra, encoding="utf-8", newline="").read())
    normed = [norm(d) for d in ex]
    big, starts = "\x00".join(normed), []
    pos = 0
    for d in normed:
        starts.append(pos); pos += len(d) + 1
    import bisect
    bad = set()
    for k in val_keys:
        i = big.find(k)
        while i >= 0:
            bad.add(bisect.bisect_right(starts, i) - 1)
            i = big.find(k, i + 1)
    kept = [d for i, d in enumerate(ex) if i not in bad]
    with open(lower_txt, "w", encoding="utf-8") as f:
        f.write("\n\n".join(kept) + "\n")
    split["extra"] = {"file": os.path.basename(extra), "documents": len(ex), "kept": len(kept),
                      "dropped_matching_validation": len(ex) - len(kept)}
json.dump(split, open(os.path.join(results, "split.json"), "w"), indent=1)
say(f"split: {len(train)} train / {len(val)} validation documents (val sha256 {split['val']['sha256'][:16]}); "
    f"extra: {split.get('extra')}")
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = "none (no nvidia-smi)"
say(f"gpu: {gpu}; jobs {jobs}; deadline {deadline:.0f} s")

# ---- the configurations
queue = []
for line in open(configs):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, freeze, seed, data, flags = (x.strip() for x in line.split("|", 4))
    queue.append({"name": name, "freeze": freeze, "seed": int(seed), "data": data, "flags": flags})

def flag_value(flags, key, default):
    t = shlex.split(flags)
    return float(t[t.index(key) + 1]) if key in t else default

def cost(c):  # tokens trained, the unit of the time estimate
    return flag_value(c["flags"], "--steps", 1000) * flag_value(c["flags"], "--batch", 8) * 256

measured = {}  # flags+data -> wall seconds; and the seconds per token of any finished run
sec_per_token = []

def estimate(c):
    k = (c["flags"], c["data"], c["freeze"])
    if k in measured:
        return measured[k]
    if sec_per_token:
        return cost(c) * max(sec_per_token) + 20
    return cost(c) / 150e3 + 25

def commands(c):
    data = train_txt + ("," + lower_txt if c["data"] == "cased+lower" else "")
    run = os.path.join(work, "runs", c["name"])
    t = [os.path.join(bin_, "qkd-train"), "--teacher", teacher, "--data", data, "--val-data", val_txt, "--out", run,
         "--backend", backend, "--bits", "4", "--group-size", "128", "--freeze", c["freeze"], "--seed", str(c["seed"]),
         "--seq-len", "256", "--save-every", "0", "--no-progress"] + shlex.split(c["flags"])
    e = [os.path.join(bin_, "qkd-eval"), "-m", os.path.join(run, "model"), "--teacher", teacher, "--text", val_txt,
         "-c", "256", "--backend", backend, "--json"]
    return run, t, e

def job_script(c):
    run, t, e = commands(c)
    q = lambda a: " ".join(shlex.quote(x) for x in a)
    return (f"rm -rf {shlex.quote(run)}; mkdir -p {shlex.quote(run)}; s=$(date +%s.%N); "
            f"{q(t)} > {shlex.quote(run)}/train.log 2>&1 || exit 11; m=$(date +%s.%N); "
            f"{q(e)} > {shlex.quote(run)}/eval.json 2> {shlex.quote(run)}/eval.log || exit 12; "
            f"echo $s $m $(date +%s.%N) > {shlex.quote(run)}/times")

def finish(c, rc, started):
    run, t, e = commands(c)
    wall = time.time() - started
    if rc != 0:
        tail = ""
        for f in ("train.log", "eval.log"):
            p = os.path.join(run, f)
            if os.path.exists(p):
                tail += f"--- {f}\n" + "".join(open(p, errors="replace").readlines()[-15:])
        open(os.path.join(results, c["name"] + ".failed"), "w").write(f"exit {rc} after {wall:.0f} s\n{tail}")
        say(f"{c['name']}: FAILED (exit {rc}, {wall:.0f} s)\n{tail[-1500:]}")
        return None
    lines = [l for l in open(os.path.join(run, "eval.json")).read().splitlines() if l.strip().startswith("{")]
    j = json.loads(lines[-1])
    s, m, en = (float(x) for x in open(os.path.join(run, "times")).read().split())
    tr, va = [], []
    for l in open(os.path.join(run, "metrics.jsonl")):
        x = json.loads(l)
        if x.get("type") == "train" and not x.get("skipped"):
            tr.append(x)
        elif x.get("type") == "val":
            va.append(x)
    r5 = lambda v: float(f"{v:.5g}") if isinstance(v, float) else v
    with open(os.path.join(results, "metrics", c["name"] + ".jsonl"), "w") as f:
        for x in tr:
            if x["step"] % 20 == 0 or x is tr[-1]:
                f.write(json.dumps({k: r5(x[k]) for k in ("type", "step", "loss", "kl", "ce", "grad_norm", "lr")
                                    if k in x}, separators=(",", ":")) + "\n")
        for x in va:
            f.write(json.dumps({k: r5(v) for k, v in x.items()}, separators=(",", ":")) + "\n")
    tps = [x["tokens_per_s"] for x in tr if "tokens_per_s" in x]
    j.update({"row": c["name"], "config": c, "gpu": gpu,
              "commands": [rel(" ".join(shlex.quote(x) for x in t)), rel(" ".join(shlex.quote(x) for x in e))],
              "timing_s": {"train": m - s, "eval": en - m, "wall": wall, "started_at": started - since},
              "train": {"steps_done": tr[-1]["step"] if tr else 0,
                        "last20_loss": statistics.fmean(x["loss"] for x in tr[-20:]) if tr else None,
                        "median_tokens_per_s": statistics.median(tps) if tps else None,
                        "val": [{k: x[k] for k in ("step", "ppl", "kl", "ce") if k in x} for x in va]}})
    json.dump(j, open(os.path.join(results, c["name"] + ".json"), "w"), indent=1)
    measured[(c["flags"], c["data"], c["freeze"])] = wall
    sec_per_token.append(wall / cost(c))
    v = j["train"]["val"]
    say(f"{c['name']}: ppl {j['perplexity']:.4f} kl {j['kl_to_teacher']:.5f} top1 {j['top1_agreement']:.4f} "
        f"(train {m - s:.0f} s, eval {en - m:.0f} s, {j['train']['median_tokens_per_s'] or 0:.0f} tok/s; val kl "
        + " ".join(f"{x['step']}:{x['kl']:.5f}" for x in v) + ")")
    shutil_rm(os.path.join(run, "checkpoint"))
    return j

def shutil_rm(p):
    import shutil
    shutil.rmtree(p, ignore_errors=True)

def do_pack():
    if not pack:
        return
    tmp = pack + ".tmp"
    with tarfile.open(tmp, "w:gz") as tf:
        for n in sorted(os.listdir(results)):
            if n in ("train.txt", "val.txt") or n.endswith(".tmp"):
                continue
            tf.add(os.path.join(results, n), arcname=n)
    os.replace(tmp, pack)

done = {}
for c in queue:
    p = os.path.join(results, c["name"] + ".json")
    if os.path.exists(p):
        done[c["name"]] = json.load(open(p))
queue = [c for c in queue if c["name"] not in done]
running = []  # (config, Popen, started)
confirmed = False
def confirm_pending():
    return confirm_after > 0 and not confirmed and any(
        d["config"]["freeze"] == "o,v" and d["config"]["seed"] == 0 for d in done.values())
while queue or running or confirm_pending():
    # the confirmation phase
    if confirm_after > 0 and not confirmed and elapsed() >= confirm_after:
        cands = [d for d in done.values() if d["config"]["freeze"] == "o,v" and d["config"]["seed"] == 0]
        # only those whose seeds can still end before the deadline (two rounds of runs at their measured time)
        fit = [d for d in cands if elapsed() + 2 * d["timing_s"]["wall"] < deadline]
        if cands and not fit:
            say("confirm: no finished configuration's seeds fit before the deadline; the sweep goes on")
            confirmed = True
        cands = fit
        if cands:
            best = min(cands, key=lambda d: d["perplexity"])
            b = best["config"]
            say(f"confirm: best so far {b['name']} ({best['perplexity']:.4f}): seeds for ov-freeze and no freeze")
            extra_q = []
            for f in ("o,v", "none"):
                for s in range(confirm_seeds):
                    if f == "o,v" and s == 0:
                        continue
                    extra_q.append(dict(b, name=f"{b['name']}-{'ov' if f == 'o,v' else 'none'}-s{s}", freeze=f, seed=s))
            extra_q = [c for c in extra_q if c["name"] not in done]
            queue = extra_q + [c for c in queue if c["name"] not in {x["name"] for x in extra_q}]
            confirmed = True
    # reap
    for item in list(running):
        c, p, st = item
        rc = p.poll()
        if rc is None and elapsed() > deadline:
            os.killpg(p.pid, 9); p.wait(); rc = -9
            say(f"{c['name']}: killed at the deadline")
        if rc is not None:
            running.remove(item)
            if rc != -9:
                j = finish(c, rc, st)
                if j:
                    done[c["name"]] = j
            do_pack()
    # start
    while queue and len(running) < jobs:
        # the first config that fits before the deadline
        pick = None
        for c in queue:
            if elapsed() + estimate(c) * (1.0 + 0.15 * len(running)) < deadline:
                pick = c
                break
        if pick is None:
            if not running:
                say("nothing left fits before the deadline: " + ", ".join(c["name"] for c in queue))
                queue = []
            break
        queue.remove(pick)
        say(f"start {pick['name']} ({pick['freeze']}, seed {pick['seed']}, {pick['data']}: {pick['flags']}); "
            f"expected {estimate(pick):.0f} s")
        env = dict(os.environ, OMP_NUM_THREADS="4")
        p = subprocess.Popen(["bash", "-c", job_script(pick)], env=env, start_new_session=True)
        running.append((pick, p, time.time()))
    time.sleep(0.5)

rows = sorted(done.values(), key=lambda d: d["perplexity"])
say("summary (ppl, kl, top1, name):")
for d in rows:
    say(f"  {d['perplexity']:.4f}  {d['kl_to_teacher']:.5f}  {d['top1_agreement']:.4f}  {d['row']}")
do_pack()
EOF
