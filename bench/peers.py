#!/usr/bin/env python3
"""PyTorch peers of qkd-bench, measured on the same GPU (run it on the GPU machine, after qkd-bench).

  1. The Llama-2-7B decode LINEAR chain: every layer's q, k, v, o, gate, up and down products at m = 1
     (32 layers, 224 products, no attention, no norms), captured once in a CUDA graph and replayed:
       - tinygemm int4 (torch.ops.aten._weight_int4pack_mm, group size 128, bf16 scales and zeros), the int4
         kernel gpt-fast and torchao use;
       - cuBLAS bf16 (torch.nn.functional.linear).
     The same chain at m = 512 through cuBLAS bf16 gives the linear part of a 512-token prefill.
  2. Hugging Face transformers LlamaForCausalLM.generate on the Llama-2-7B shape (random init, bf16, static KV
     cache when this transformers has it, eager: no torch.compile), greedy, after a 512-token prompt: decode
     ms/token from the difference of two generation lengths.
  3. A device-to-device copy of 1 GiB (bytes read + written), the same ceiling qkd-bench measures.
Each timing is a median of CUDA-event timings after warm-up. Weights are random (never zeros: METHOD.md).

  python3 bench/peers.py [--json] [--skip-hf] [--reps 50]
"""
import argparse
import json
import statistics
import sys
import time

import torch

LLAMA2_7B = dict(dim=4096, ffn_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000)


def layer_shapes(c):
    """(n, k) of each linear product of one layer, nn.Linear layout."""
    d, f, kv = c["dim"], c["ffn_dim"], c["n_kv_heads"] * (c["dim"] // c["n_heads"])
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]


def event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_median_ms(fn, reps):
    """Captures fn in a CUDA graph and returns the median time of one replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    times = [event_ms(graph.replay) for _ in range(reps)]
    return statistics.median(times), min(times)


def pack_int4(n, k):
    """Random int4 weights [n, k] in tinygemm's layout. PyTorch >= 2.5 takes uint8 [n, k/2] (two nibbles a
    byte); older versions took int32 [n, k]: try the current signature first."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        return torch.ops.aten._convert_weight_to_int4pack(w, 8)
    except RuntimeError:
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        return torch.ops.aten._convert_weight_to_int4pack(w, 8)


def tinygemm_chain(c, reps, group=128):
    shapes = layer_shapes(c) * c["n_layers"]
    weights, nbytes = [], 0
    for n, k in shapes:
        packed = pack_int4(n, k)
        # [k/group, n, 2]: scale and zero point of each group, bf16
        sz = torch.empty(k // group, n, 2, dtype=torch.bfloat16, device="cuda").uniform_(0.001, 0.01)
        weights.append((packed, sz, k))
        nbytes += packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for _, k in shapes}

    def step():
        for packed, sz, k in weights:
            torch.ops.aten._weight_int4pack_mm(xs[k], packed, group, sz)

    ms, ms_min = graph_median_ms(step, reps)
    del weights
    torch.cuda.empty_cache()
    return dict(ms=ms, ms_min=ms_min, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9, products=len(shapes),
                group_size=group)


def cublas_chain(c, reps, m_values=(1, 512)):
    shapes = layer_shapes(c) * c["n_layers"]
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * (k ** -0.5) for n, k in shapes]
    nbytes = sum(w.numel() * 2 for w in weights)
    out = {}
    for m in m_values:
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _, k in shapes}

        def step():
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

        ms, ms_min = graph_median_ms(step, reps if m == 1 else max(10, reps // 5))
        flops = 2.0 * m * sum(n * k for n, k in shapes)
        out[f"m{m}"] = dict(ms=ms, ms_min=ms_min, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                            tflops=flops / (ms * 1e-3) / 1e12)
    del weights
    torch.cuda.empty_cache()
    return out


def copy_bandwidth(nbytes=1 << 30, reps=20):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(event_ms(lambda: dst.copy_(src)) for _ in range(reps))
    del src, dst
    torch.cuda.empty_cache()
    return dict(bytes=nbytes, ms=ms, gbps=2 * nbytes / (ms * 1e-3) / 1e9)


def hf_generate(c, prompt_len=512, new_tokens=64):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=c["dim"], intermediate_size=c["ffn_dim"], num_hidden_layers=c["n_layers"],
                      num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
                      vocab_size=c["vocab_size"], max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    ids = torch.randint(3, c["vocab_size"], (1, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    cache = "static"

    def run(n):
        kwargs = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
        if cache:
            kwargs["cache_implementation"] = cache
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n, out.shape
        return (time.perf_counter() - t0) * 1e3

    try:
        run(2)
    except Exception as e:  # an older transformers without static caches for generate
        print(f"peers: static cache unavailable ({type(e).__name__}: {e}); using the default cache",
              file=sys.stderr)
        cache = None
        run(2)
    short = statistics.median(run(1) for _ in range(3))
    long = statistics.median(run(1 + new_tokens) for _ in range(3))
    del model
    torch.cuda.empty_cache()
    return dict(ms_per_token=(long - short) / new_tokens, ttft_ms=short, prompt=prompt_len, new_tokens=new_tokens,
                cache=cache or "dynamic", compiled=False, transformers=transformers.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--reps", type=int, default=50, help="timed graph replays per chain (median)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out transformers generate")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("peers.py: no CUDA device")
    torch.manual_seed(0)
    c = LLAMA2_7B
    res = dict(tool="peers.py", device=torch.cuda.get_device_name(0), torch=torch.__version__, shape="llama2-7b",
               copy=copy_bandwidth())
    parts = [("tinygemm_int4_chain", lambda: tinygemm_chain(c, args.reps)),
             ("cublas_bf16_chain", lambda: cublas_chain(c, args.reps))]
    if not args.skip_hf:
        parts.append(("hf_generate", lambda: hf_generate(c)))
    for key, measure in parts:  # one peer failing (an API that moved) leaves the others' numbers
        try:
            res[key] = measure()
        except Exception as e:
            print(f"peers: {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
            res[key] = dict(error=f"{type(e).__name__}: {e}")
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"peers on {res['device']} (torch {res['torch']}), Llama-2-7B shape")
    print(f"  copy (D2D, 1 GiB):             {res['copy']['gbps']:.0f} GB/s")
    t, b, h = res["tinygemm_int4_chain"], res["cublas_bf16_chain"], res.get("hf_generate", {})
    if "ms" in t:
        print(f"  tinygemm int4 chain (m=1):     {t['ms']:.3f} ms  ({t['gbps']:.0f} GB/s)")
    if "m1" in b:
        print(f"  cuBLAS bf16 chain (m=1):       {b['m1']['ms']:.3f} ms  ({b['m1']['gbps']:.0f} GB/s)")
        print(f"  cuBLAS bf16 chain (m=512):     {b['m512']['ms']:.3f} ms  ({b['m512']['tflops']:.0f} TFLOP/s)")
    if "ms_per_token" in h:
        print(f"  HF generate ({h['cache']} cache): {h['ms_per_token']:.2f} ms/token")
    for key in ("tinygemm_int4_chain", "cublas_bf16_chain", "hf_generate"):
        if "error" in res.get(key, {}):
            print(f"  {key}: {res[key]['error']}")


if __name__ == "__main__":
    main()
