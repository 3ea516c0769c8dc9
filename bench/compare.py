#!/usr/bin/env python3
"""Prints qkd-bench results beside the PyTorch peers' (bench/peers.py), with the ratios the targets of
issue 4 are stated in (Llama-2-7B shape, batch 1, context 512):
  - qkd int4 decode against the copy bandwidth measured in the same run (target >= 85%);
  - the tinygemm int4 linear chain alone over qkd's whole int4 decode step (target >= 1.45x);
  - qkd int4 prefill over qkd bf16 prefill of 512 tokens (target <= 1.15x);
  - HF transformers generate over qkd, per decode token.

  python3 bench/compare.py QKD_BENCH.json [QKD_BENCH.json ...] [--peers PEERS.json]
Each qkd-bench JSON is the output of `qkd-bench --json`; files that fail to parse are reported and skipped.
"""
import argparse
import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare: skipping {path}: {e}", file=sys.stderr)
        return None


def decode_at(run, context):
    for d in run.get("decode", []):
        if d["context"] == context:
            return d
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("qkd", nargs="+", help="qkd-bench --json outputs")
    ap.add_argument("--peers", help="bench/peers.py --json output")
    ap.add_argument("--context", type=int, default=512, help="context of the headline comparison")
    args = ap.parse_args()
    runs = [r for r in (load(p) for p in args.qkd) if r is not None]
    peers = load(args.peers) if args.peers else None

    print("qkd-bench (batch 1; decode = replay of the captured step, median; ms/token @ context, % of copy)")
    print(f"{'model':<16} {'quant':<5} {'prefill ms':>10} {'tok/s':>8} {'TTFT ms':>8}   decode")
    for r in runs:
        cells = "  ".join(f"{d['ms']:.3f}@{d['context']} ({100 * d['frac_copy']:.0f}%)" for d in r.get("decode", []))
        print(f"{r['model']:<16} {r['quant']:<5} {r['prefill']['ms']:>10.2f} {r['prefill']['tok_per_s']:>8.0f}"
              f" {r['ttft_ms']:>8.2f}   {cells}")

    tg = peers.get("tinygemm_int4_chain", {}) if peers else {}
    cb = peers.get("cublas_bf16_chain", {}) if peers else {}
    hf = peers.get("hf_generate", {}) if peers else {}
    if peers:
        print(f"\npeers ({peers['device']}, torch {peers['torch']}), Llama-2-7B shape")
        print(f"  copy D2D                      {peers['copy']['gbps']:8.0f} GB/s")
        if "ms" in tg:
            print(f"  tinygemm int4 linear chain    {tg['ms']:8.3f} ms  ({tg['gbps']:.0f} GB/s)")
        if "m1" in cb:
            print(f"  cuBLAS bf16 linear chain      {cb['m1']['ms']:8.3f} ms  ({cb['m1']['gbps']:.0f} GB/s)")
            print(f"  cuBLAS bf16 chain, 512 tokens {cb['m512']['ms']:8.3f} ms")
        if "ms_per_token" in hf:
            print(f"  HF generate ({hf['cache']} cache)   {hf['ms_per_token']:8.3f} ms/token")
        for name, part in (("tinygemm", tg), ("cuBLAS", cb), ("HF generate", hf)):
            if "error" in part:
                print(f"  {name}: {part['error']}")

    def find(model, quant):
        for r in runs:
            if r["model"] == model and r["quant"] == quant:
                return r
        return None

    q4, q16 = find("llama2-7b", "int4"), find("llama2-7b", "bf16")
    print(f"\nLlama-2-7B, context {args.context}: ratios")
    d4 = q4 and decode_at(q4, args.context)
    d16 = q16 and decode_at(q16, args.context)
    if d4:
        print(f"  qkd int4 decode: {d4['ms']:.3f} ms/token, {100 * d4['frac_copy']:.1f}% of copy bandwidth "
              f"(target >= 85%)")
    if d4 and "ms" in tg:
        print(f"  tinygemm int4 chain / qkd int4 step: {tg['ms'] / d4['ms']:.2f}x (target >= 1.45x)")
    if d4 and "ms_per_token" in hf:
        print(f"  HF generate / qkd int4: {hf['ms_per_token'] / d4['ms']:.1f}x")
    if d16 and "m1" in cb:
        print(f"  cuBLAS bf16 chain / qkd bf16 step: {cb['m1']['ms'] / d16['ms']:.2f}x")
    if q4 and q16:
        print(f"  qkd prefill int4 / bf16: {q4['prefill']['ms'] / q16['prefill']['ms']:.2f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
