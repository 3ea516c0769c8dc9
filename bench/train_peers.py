#!/usr/bin/env python3
"""PyTorch peer of `qkd-bench --train`: the same distillation step in Hugging Face transformers, on the same GPU.

One step, as qkd's engine does it (train/engine.h):
  - teacher: LlamaForCausalLM of the preset's shape (models/<preset>.json), random init, bf16, eval, no_grad;
  - student: a copy of the same weights in which every linear layer of the blocks is fake-quantized, int4,
    group 128, symmetric, with a learnable step size per group (LSQ: w_q = s * round_ste(clamp(w / s, -8, 7)),
    the rounding's gradient passed straight through, the step sizes' gradient scaled by 1/sqrt(group * 7)),
    except o_proj and v_proj: frozen, their weights replaced once by the round-to-nearest int4 values
    (dequantized, bf16, requires_grad False), as in ov-freeze. Embedding, norms and LM head train at full
    precision, as in qkd;
  - loss: KL(teacher || student) over the vocabulary, F.kl_div(log_softmax(z_s), log_softmax(z_t),
    log_target=True, reduction="batchmean") on [tokens, vocab] in fp32, i.e. the mean over tokens (temperature 1);
  - backward, the global gradient norm clipped at 1 (torch.nn.utils.clip_grad_norm_), fused AdamW
    (torch.optim.AdamW(fused=True), lr 1e-5, betas 0.9/0.95, no weight decay), zero_grad(set_to_none=True).
Precision (--precision): "amp" (default) keeps fp32 master weights, gradients and AdamW state and computes in bf16
under torch.autocast, the usual PyTorch form of what qkd does (fp32 master, bf16 compute); "bf16" holds the
student's parameters and AdamW state in bf16 (less memory and traffic, a weaker optimizer). The frozen layers and
the teacher are bf16 in both.
Attention is SDPA (attn_implementation "sdpa", causal, no mask: the flash kernel). Tokens are random.

Each mode is timed over whole steps (torch.cuda.synchronize, then time.perf_counter) after warm-up, and reported
as the median: "eager", and "compile" (torch.compile of the teacher's forward and of the student's forward plus
the loss; the backward is compiled by AOTAutograd; the first steps include the compilation, reported apart).
A mode that fails reports the exception's text instead of a time. A mode that runs out of memory is retried
with the batch split into micro-batches (gradients accumulated over them), and says so.
Also a cuBLAS bf16 GEMM (torch.matmul, 8192^3) as a cross-check of the rate qkd-bench measures.

  python3 bench/train_peers.py [--json] [--out FILE] [--preset tinyllama-1.1b] [--batch 8] [--seq-len 1024]
                               [--steps 10] [--warmup 2] [--modes eager,compile] [--precision amp|bf16]
--out rewrites FILE with the results so far after each mode, so a run cut short still leaves the finished modes.
"""
import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
GROUP, BITS = 128, 4
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
FROZEN = ("o_proj", "v_proj")
QUANTIZED = ("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj")
DEVICE = "cuda"


def load_preset(name):
    path = Path(name)
    if not path.exists():
        path = ROOT / "models" / f"{name}.json"
    with open(path) as f:
        return json.load(f)


def make_config(p):
    from transformers import LlamaConfig

    kw = dict(hidden_size=p["dim"], intermediate_size=p["ffn_dim"], num_hidden_layers=p["n_layers"],
              num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], head_dim=p["head_dim"],
              vocab_size=p["vocab_size"], max_position_embeddings=p["max_seq_len"], rms_norm_eps=p["norm_eps"],
              rope_theta=p.get("rope_theta", 10000.0), tie_word_embeddings=p.get("tied_embeddings", False),
              hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False)
    try:
        cfg = LlamaConfig(**kw, attn_implementation="sdpa")
    except (TypeError, ValueError):
        cfg = LlamaConfig(**kw)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:  # a transformers whose setter refuses: the model's default is reported below
        pass
    return cfg


def lsq_fake_quant(w, s, grad_scale):
    """w [n, k], s [n, k / GROUP] -> the fake-quantized weight [n, k]."""
    n, k = w.shape
    s = s * grad_scale + (s - s * grad_scale).detach()  # LSQ: the value s, the gradient scaled by grad_scale
    s = s.unsqueeze(-1)
    v = (w.view(n, k // GROUP, GROUP) / s).clamp(QMIN, QMAX)
    q = v + (v.round() - v).detach()  # round to nearest, gradient passed straight through
    return (q * s).view(n, k)


def rtn_scales(w):
    """Round-to-nearest step sizes of w [n, k]: the group's largest magnitude lands on QMAX."""
    n, k = w.shape
    amax = w.float().view(n, k // GROUP, GROUP).abs().amax(-1)
    return (amax / QMAX).clamp_min(1e-8)


class FakeQuantLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        w = lin.weight.detach()
        self.weight = nn.Parameter(w.clone())
        self.scale = nn.Parameter(rtn_scales(w).to(w.dtype))
        self.grad_scale = 1.0 / math.sqrt(GROUP * QMAX)

    def forward(self, x):
        return F.linear(x, lsq_fake_quant(self.weight, self.scale, self.grad_scale))


def freeze_rtn(lin):
    w = lin.weight.detach().float()
    n, k = w.shape
    s = rtn_scales(w).unsqueeze(-1)
    deq = ((w.view(n, k // GROUP, GROUP) / s).round().clamp(QMIN, QMAX) * s).view(n, k)
    lin.weight = nn.Parameter(deq.to(torch.bfloat16), requires_grad=False)


def quantize_student(model):
    n_q = n_f = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in FROZEN:
                    freeze_rtn(child)
                    n_f += 1
                elif name in QUANTIZED:
                    setattr(parent, name, FakeQuantLinear(child))
                    n_q += 1
    return n_q, n_f


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_models(preset, precision):
    from transformers import LlamaForCausalLM

    cfg = make_config(preset)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        student = LlamaForCausalLM(cfg)  # fp32, HF's init: normal(0, 0.02), norms 1
    teacher = copy.deepcopy(student).to(torch.bfloat16).eval().requires_grad_(False)
    if precision == "bf16":
        student = student.to(torch.bfloat16)
    n_q, n_f = quantize_student(student)
    student.train()
    attn = getattr(student.config, "_attn_implementation", None)
    if attn != "sdpa" and hasattr(student, "set_attn_implementation"):
        try:
            student.set_attn_implementation("sdpa")
            teacher.set_attn_implementation("sdpa")
            attn = student.config._attn_implementation
        except Exception as e:
            print(f"train_peers: could not select sdpa attention ({type(e).__name__}: {e})", file=sys.stderr)
    return teacher, student, dict(quantized_linears=n_q, frozen_linears=n_f, attn_implementation=attn)


def kd_loss(s_logits, t_logits):
    """KL(teacher || student), mean over tokens, fp32."""
    vocab = s_logits.shape[-1]
    s = F.log_softmax(s_logits.float().reshape(-1, vocab), dim=-1)
    t = F.log_softmax(t_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def make_step_fns(teacher, student, precision, compiled, compile_mode):
    def teacher_logits(ids):
        with torch.no_grad():
            return teacher(input_ids=ids, use_cache=False).logits

    def student_loss(ids, t_logits):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "amp"):
            logits = student(input_ids=ids, use_cache=False).logits
        return kd_loss(logits, t_logits)

    if compiled:
        kw = {} if compile_mode is None else dict(mode=compile_mode)
        return torch.compile(teacher_logits, **kw), torch.compile(student_loss, **kw)
    return teacher_logits, student_loss


def free_memory():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_mode(teacher, student, opt, windows, micro_batch, args, compiled):
    """Times args.steps steps after args.warmup; windows [warmup + steps, batch, seq_len] on the GPU."""
    tf, sl = make_step_fns(teacher, student, args.precision, compiled, args.compile_mode)
    params = [p for p in student.parameters() if p.requires_grad]
    batch = windows.shape[1]
    n_micro = batch // micro_batch

    def step(win):
        total = torch.zeros((), device=DEVICE)
        for j in range(n_micro):
            ids = win[j * micro_batch:(j + 1) * micro_batch]
            t = tf(ids)
            loss = sl(ids, t) * (micro_batch / batch)
            loss.backward()
            total += loss.detach()
            del t, loss
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, gnorm

    times, losses, gnorms = [], [], []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, gnorm = step(windows[i])
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
        gnorms.append(float(gnorm))
    timed = times[args.warmup:]
    ms = statistics.median(timed)
    tokens = windows.shape[1] * windows.shape[2]
    finite = all(math.isfinite(x) for x in losses + gnorms)
    if not finite:
        print(f"train_peers: warning: a non-finite loss or gradient norm ({losses}, {gnorms})", file=sys.stderr)
    return dict(ms=ms, ms_mean=statistics.fmean(timed), ms_min=min(timed), ms_max=max(timed), all_ms=timed,
                warmup_ms=times[:args.warmup], tokens_per_s=tokens / (ms * 1e-3), micro_batch=micro_batch,
                peak_memory=torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0,
                kl_first=losses[args.warmup], kl_last=losses[-1], grad_norm_first=gnorms[args.warmup],
                grad_norm_last=gnorms[-1], finite=finite)


def measure_mode(teacher, student, opt, windows, args, compiled):
    """time_mode at the full batch; on running out of memory, halves the micro-batch and tries again."""
    micro_batch = windows.shape[1]
    notes = []
    while True:
        try:
            r = time_mode(teacher, student, opt, windows, micro_batch, args, compiled)
            if notes:
                r["note"] = "; ".join(notes)
            return r
        except torch.cuda.OutOfMemoryError as e:
            msg = f"out of memory at micro-batch {micro_batch} ({str(e).splitlines()[0][:200]})"
        # here, outside the except block, the exception's frames and the tensors they hold are gone
        opt.zero_grad(set_to_none=True)
        if compiled:
            torch._dynamo.reset()
        free_memory()
        print(f"train_peers: {msg}", file=sys.stderr)
        notes.append(msg)
        if micro_batch == 1:
            return dict(error="; ".join(notes))
        micro_batch //= 2
        while windows.shape[1] % micro_batch:
            micro_batch -= 1


def gemm_tflops(size=8192, reps=10):
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.t()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b.t()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    del a, b
    free_memory()
    return dict(m=size, n=size, k=size, ms_min=best, tflops=2 * size ** 3 / (best * 1e-3) / 1e12)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", help="also write the JSON here, rewritten after each mode")
    ap.add_argument("--preset", default="tinyllama-1.1b", help="models/NAME.json, or a path to such a file")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile mode: at least 3)")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--precision", default="amp", choices=("amp", "bf16"))
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run of this script on a small preset, no numbers that mean anything")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("train_peers.py: no CUDA device")
    if args.batch < 1 or args.seq_len < 2 or args.steps < 1 or args.warmup < 0:
        sys.exit("train_peers.py: --batch and --steps must be positive, --seq-len at least 2, --warmup >= 0")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("eager", "compile"):
            sys.exit(f"train_peers.py: unknown mode {m!r} (eager, compile)")

    import transformers

    preset = load_preset(args.preset)
    res = dict(tool="train_peers.py", device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
               torch=torch.__version__, transformers=transformers.__version__, model=preset.get("name", args.preset),
               shape={k: preset[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                             "vocab_size")},
               batch=args.batch, seq_len=args.seq_len, tokens_per_step=args.batch * args.seq_len,
               steps=args.steps, warmup=args.warmup, precision=args.precision,
               quant=dict(bits=BITS, group_size=GROUP, frozen="o,v", scales="learnable per group (LSQ)"),
               optimizer="torch.optim.AdamW(fused=True), lr 1e-5, betas (0.9, 0.95), clip 1.0")

    def write():
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=2)
            Path(tmp).replace(args.out)

    if DEVICE == "cuda":
        try:
            res["gemm"] = gemm_tflops()
        except Exception as e:
            res["gemm"] = dict(error=f"{type(e).__name__}: {e}")
    t0 = time.perf_counter()
    teacher, student, info = build_models(preset, args.precision)
    res.update(info)
    res["build_s"] = time.perf_counter() - t0
    params = [p for p in student.parameters() if p.requires_grad]
    res["trained_parameters"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    g = torch.Generator(device=DEVICE)
    g.manual_seed(1)
    write()

    for mode in modes:
        compiled = mode == "compile"
        warmup = max(args.warmup, 3) if compiled else args.warmup
        run_args = argparse.Namespace(**{**vars(args), "warmup": warmup})
        windows = torch.randint(0, preset["vocab_size"], (warmup + args.steps, args.batch, args.seq_len),
                                device=DEVICE, generator=g)
        print(f"train_peers: {mode} ({args.precision}), {warmup} warm-up + {args.steps} steps", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            res[mode] = measure_mode(teacher, student, opt, windows, run_args, compiled)
        except Exception as e:  # a mode that fails (a compile error) leaves the other's numbers
            traceback.print_exc(file=sys.stderr)
            res[mode] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        if "error" in res[mode]:
            opt.zero_grad(set_to_none=True)
            free_memory()
        res[mode]["wall_s"] = time.perf_counter() - t0
        if "ms" in res[mode]:
            print(f"train_peers: {mode}: {res[mode]['ms']:.1f} ms/step, {res[mode]['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr)
        write()
        del windows
        free_memory()

    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"train_peers on {res['device']} (torch {res['torch']}, transformers {res['transformers']}), "
          f"{res['model']}, batch {args.batch} x seq {args.seq_len}, {args.precision}")
    for mode in modes:
        r = res[mode]
        if "ms" in r:
            print(f"  {mode:<8} {r['ms']:8.1f} ms/step  {r['tokens_per_s']:8.0f} tokens/s  micro-batch "
                  f"{r['micro_batch']}  peak {r['peak_memory'] / 2 ** 30:.1f} GiB")
        else:
            print(f"  {mode:<8} {r.get('error')}")


if __name__ == "__main__":
    main()
