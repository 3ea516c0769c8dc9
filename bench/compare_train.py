#!/usr/bin/env python3
"""Prints `qkd-bench --train --json` beside bench/train_peers.py, with the targets of issue 5 (one distillation
step, TinyLlama-1.1B shape, batch 8 x seq 1024, int4 g128 student with o,v frozen, on an H100):
  - qkd at least 2x PyTorch eager, and at least 1.3x torch.compile, in tokens/s (the same tokens per step);
  - qkd's model-FLOPs utilisation at least 40% of the bf16 dense peak.
The peers' TFLOP/s and MFU use qkd's model-FLOPs count of the same step (apps/train_bench.h states the formula),
so every row's MFU is the same FLOPs over that row's time. MFU(GEMM) is a fraction of the cuBLASLt bf16 GEMM rate
qkd-bench measured in its run.

  python3 bench/compare_train.py QKD_TRAIN.json [--peers TRAIN_PEERS.json]
Files that are missing or do not parse are reported and skipped.
"""
import argparse
import json
import sys

TARGET_EAGER, TARGET_COMPILE, TARGET_MFU = 2.0, 1.3, 0.40


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare_train: skipping {path}: {e}", file=sys.stderr)
        return None


def mark(ok):
    return "met" if ok else "NOT met"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("qkd", help="qkd-bench --train --json output")
    ap.add_argument("--peers", help="bench/train_peers.py output")
    args = ap.parse_args()
    q = load(args.qkd)
    p = load(args.peers) if args.peers else None
    if q is not None and q.get("mode") != "train":
        print(f"compare_train: {args.qkd} is not a qkd-bench --train result", file=sys.stderr)
        q = None
    if q is None and p is None:
        print("compare_train: nothing to compare")
        return

    flops = q["flops"]["total"] if q else None
    peak = q["peak_tflops"] if q else 989.4
    gemm = q["gemm"]["tflops"] if q else None
    same = True
    if q and p:
        for key in ("batch", "seq_len"):
            if q[key] != p[key]:
                print(f"compare_train: qkd and the peers differ in {key} ({q[key]} vs {p[key]}): no ratios")
                same = False
        if q["shape"] != p["shape"]:
            print(f"compare_train: qkd and the peers differ in shape ({q['shape']} vs {p['shape']}): no ratios")
            same = False
        if q["device"] != p["device"]:
            print(f"compare_train: warning: qkd ran on {q['device']}, the peers on {p['device']}")

    ref = q or p
    print(f"Distillation step: {ref['model']}, batch {ref['batch']} x seq {ref['seq_len']} "
          f"({ref['tokens_per_step']:.0f} tokens), int4 g128, o,v frozen, KL loss, AdamW; {ref['device']}")
    print(f"{'':<26} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU(peak)':>10} {'MFU(GEMM)':>10}  notes")

    def row(name, ms, tokens_per_s, note=""):
        if flops and same:
            tf = flops / (ms * 1e-3) / 1e12
            cells = f"{tf:>8.0f} {100 * tf / peak:>9.1f}% " + (f"{100 * tf / gemm:>9.1f}%" if gemm else f"{'':>10}")
        else:
            cells = f"{'':>8} {'':>10} {'':>10}"
        print(f"{name:<26} {ms:>9.1f} {tokens_per_s:>10.0f} {cells}  {note}")

    if q:
        row("qkd (CUDA engine)", q["step_ms"]["median"], q["tokens_per_s"],
            f"fp32 master, bf16 compute; {q['device_memory_used'] / 2 ** 30:.1f} GiB in use")
    peer_rows = {}
    if p:
        for mode in ("eager", "compile"):
            r = p.get(mode)
            name = f"PyTorch {mode} ({p['precision']})"
            if r is None:
                continue
            if "ms" not in r:
                print(f"{name:<26} failed: {r.get('error', '?')[:300]}")
                continue
            peer_rows[mode] = r
            note = f"micro-batch {r['micro_batch']}, peak {r['peak_memory'] / 2 ** 30:.1f} GiB"
            if mode == "compile" and r.get("warmup_ms"):
                note += f", first step {r['warmup_ms'][0] / 1e3:.0f} s (compiling)"
            if r.get("note"):
                note += f"; {r['note']}"
            row(name, r["ms"], r["tokens_per_s"], note)
    g = [f"qkd cuBLASLt {q['gemm']['tflops']:.0f}"] if q else []
    if p and "tflops" in p.get("gemm", {}):
        g.append(f"torch.matmul {p['gemm']['tflops']:.0f}")
    if g:
        print(f"bf16 GEMM 8192^3, best of 10: {', '.join(g)} TFLOP/s (MFU(GEMM) uses qkd's); MFU(peak) is of "
              f"{peak} TFLOP/s")
    if q and not q.get("finite", True):
        print("warning: qkd had a non-finite loss or gradient norm")
    for mode, r in peer_rows.items():
        if not r.get("finite", True):
            print(f"warning: PyTorch {mode} had a non-finite loss or gradient norm")

    print("\nTargets (issue 5)")
    if q is None:
        print("  no qkd-bench --train result")
    if q and same:
        for mode, target in (("eager", TARGET_EAGER), ("compile", TARGET_COMPILE)):
            r = peer_rows.get(mode)
            if r is None:
                print(f"  qkd / PyTorch {mode}: no peer number")
                continue
            ratio = q["tokens_per_s"] / r["tokens_per_s"]
            print(f"  qkd / PyTorch {mode:<8} {ratio:6.2f}x tokens/s   (target >= {target}x)   {mark(ratio >= target)}")
    if q:
        mfu = q["mfu_peak"]
        print(f"  qkd MFU of the bf16 peak {100 * mfu:5.1f}%          (target >= {100 * TARGET_MFU:.0f}%)    "
              f"{mark(mfu >= TARGET_MFU)}")
        print(f"  (of the GEMM measured in the same run: {100 * q['mfu_gemm']:.1f}%)")


if __name__ == "__main__":
    main()
