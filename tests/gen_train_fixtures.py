#!/usr/bin/env python3
"""Writes the PyTorch autograd reference for qkd's whole-model training gradients (tests/test_train_grad.cpp).

Run on the GPU machine (transformers and torch are there); the computation itself runs on the CPU in fp32 so the
reference is exact to fp32 rounding:
    python3 tests/gen_train_fixtures.py --out tests/fixtures/train
Everything written is small and committed.

tiny-train/   student and teacher: random LlamaForCausalLM of one shape (GQA 2:1, head_dim 64 so the CUDA
              kernels take it, untied embeddings, non-trivial norms), saved as HF fp32 safetensors
              (student/, teacher/), windows.json (token windows [batch, seq + 1]) and, for each case,
              <case>.safetensors with the loss and the gradient of every trainable tensor.
Cases (the loss is the mean over every token of the batch):
  dense   bits 16:  0.5 CE + 1.0 * T^2 KL(teacher || student) at T = 2 + 0.3 contrastive (tau 0.1)
  qat     bits 4, group 32, o and v frozen (their int4 values given), per-group learnable scales with the LSQ
          gradient, a learnable clip factor per module: 0.5 CE + 1.0 T^2 KL at T = 2
Fake quantization exactly as kernels/fake_quant.h defines it: s_e = bf16(gamma * s), q = clamp(round_half_even(
w / s_e), -8, 7), wq = s_e q; STE for w, LSQ for s with gradient scale 1 / sqrt(group * 7), chain rule for gamma.
Tensors of q_proj / k_proj rows are written in qkd's interleaved RoPE row order (the C++ loader un-permutes the
HF checkpoint the same way), so the C++ test compares them directly.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, SEQ = 2, 24
GROUP, BITS = 32, 4
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
CE_W, KD_W, TEMP = 0.5, 1.0, 2.0
CTR_W, CTR_TAU = 0.3, 0.1


def make_config():
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2)


def make_model(cfg, seed):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # std 0.06: logits far enough from uniform that KL and CE have real gradients
    return m


def interleave_rows(t, n_heads, head_dim):
    """HF rotate-half row order -> qkd's interleaved order (loader/hf_checkpoint.cpp)."""
    idx = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            idx += [h * head_dim + i, h * head_dim + i + head_dim // 2]
    return t[idx]


def bf16_round(x):
    return x.to(torch.bfloat16).to(torch.float32)


def fake_quant(w, s, gamma):
    """kernels/fake_quant.h in autograd form."""
    n, k = w.shape
    g_scale = 1.0 / math.sqrt(GROUP * QMAX)
    s_l = s * g_scale + (s - s * g_scale).detach()  # LSQ gradient scale: value s, gradient scaled
    s_eff = gamma * s_l
    s_e = s_eff + (bf16_round(s_eff) - s_eff).detach()  # STE through the bf16 rounding
    s_full = s_e.repeat_interleave(GROUP, dim=1)
    v = w / s_full
    vc = torch.clamp(v, QMIN, QMAX)
    q = vc + (torch.round(vc) - vc).detach()
    return q * s_full


def rtn_scales(w):
    """Initial step sizes for the fixture: bf16(amax / 7) per group (any positive value works for the test)."""
    n, k = w.shape
    amax = w.abs().reshape(n, k // GROUP, GROUP).amax(dim=2)
    return bf16_round(torch.clamp(amax / QMAX, min=1e-8))


def frozen_values(w, s):
    s_full = s.repeat_interleave(GROUP, dim=1)
    return torch.clamp(torch.round(w / s_full), QMIN, QMAX) * s_full


def losses(student_logits, teacher_logits, targets, hs, ht, ctr_w):
    v = student_logits.shape[-1]
    z = student_logits.reshape(-1, v)
    t = teacher_logits.reshape(-1, v)
    ce = F.cross_entropy(z, targets.reshape(-1), reduction="mean")
    log_ps = F.log_softmax(z / TEMP, dim=-1)
    log_pt = F.log_softmax(t / TEMP, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * TEMP * TEMP
    loss = CE_W * ce + KD_W * kl
    ctr = torch.zeros(())
    if ctr_w > 0:
        n_tok = 0
        tot = torch.zeros(())
        for b in range(hs.shape[0]):
            zs = F.normalize(hs[b], dim=-1, eps=1e-6)
            zt = F.normalize(ht[b], dim=-1, eps=1e-6)
            sim = zs @ zt.T / CTR_TAU
            tot = tot + F.cross_entropy(sim, torch.arange(sim.shape[0]), reduction="sum")
            n_tok += sim.shape[0]
        ctr = tot / n_tok
        loss = loss + ctr_w * ctr
    return loss, ce, kl, ctr


def run_case(case, student, teacher, windows, cfg, out_dir):
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        t_out = teacher(inputs, output_hidden_states=True)
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    params = dict(student.named_parameters())
    saved = {}
    extra = {}
    if case == "dense":
        out = student(inputs, output_hidden_states=True)
        loss, ce, kl, ctr = losses(out.logits, t_out.logits, targets, out.hidden_states[-1],
                                   t_out.hidden_states[-1], CTR_W)
        loss.backward()
        for name, p in params.items():
            g = p.grad.detach().clone()
            if name.endswith("q_proj.weight"):
                g = interleave_rows(g, nh, hd)
            if name.endswith("k_proj.weight"):
                g = interleave_rows(g, nkv, hd)
            saved["grad." + name] = g
    else:
        # Replace every linear layer's weight by its fake-quantized (or frozen) value through functional calls.
        scales, gammas, originals = {}, {}, {}
        for name, p in params.items():
            if "layers" in name and name.endswith("proj.weight"):
                mod = name[: -len(".weight")]
                s0 = rtn_scales(p.detach())
                if ".o_proj" in name or ".v_proj" in name:
                    extra["frozen." + mod] = frozen_values(p.detach(), s0)
                    extra["frozen_scales." + mod] = s0
                else:
                    scales[mod] = s0.clone().requires_grad_(True)
                    gammas[mod] = torch.tensor([1.25], requires_grad=True)
                originals[mod] = p
        wq = {}
        for mod, p in originals.items():
            if mod in scales:
                wq[mod + ".weight"] = fake_quant(p, scales[mod], gammas[mod])
            else:
                wq[mod + ".weight"] = extra["frozen." + mod]
        from torch.func import functional_call
        full = {n: p for n, p in params.items()}
        full.update(wq)
        out = functional_call(student, full, (inputs,), {"output_hidden_states": True})
        loss, ce, kl, ctr = losses(out.logits, t_out.logits, targets, out.hidden_states[-1],
                                   t_out.hidden_states[-1], 0.0)
        loss.backward()
        for name, p in params.items():
            mod = name[: -len(".weight")]
            if mod in originals and mod not in scales:
                continue  # frozen: no gradient
            g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            rows = nh if name.endswith("q_proj.weight") else nkv if name.endswith("k_proj.weight") else 0
            if rows:
                g = interleave_rows(g, rows, hd)
            saved["grad." + name] = g
        for mod, s in scales.items():
            g = s.grad.detach().clone()
            s0 = s.detach().clone()
            rows = nh if mod.endswith("q_proj") else nkv if mod.endswith("k_proj") else 0
            if rows:
                g, s0 = interleave_rows(g, rows, hd), interleave_rows(s0, rows, hd)
            saved["grad." + mod + ".scales"] = g
            saved["init." + mod + ".scales"] = s0
            saved["grad." + mod + ".clip"] = gammas[mod].grad.detach().clone()
            saved["init." + mod + ".clip"] = gammas[mod].detach().clone()
        for key, val in extra.items():
            if key.startswith("frozen_scales."):
                saved["init." + key[len("frozen_scales."):] + ".frozen_scales"] = val
    saved["loss"] = torch.tensor([loss.item(), ce.item(), kl.item(), ctr.item()], dtype=torch.float32)
    save_file({k: v.contiguous().float() for k, v in saved.items()}, os.path.join(out_dir, case + ".safetensors"))
    print(case, "loss", loss.item(), "ce", ce.item(), "kl", kl.item(), "ctr", ctr.item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(8)
    cfg = make_config()
    d = os.path.join(args.out, "tiny-train")
    os.makedirs(d, exist_ok=True)
    student = make_model(cfg, 11)
    teacher = make_model(cfg, 12)
    student.save_pretrained(os.path.join(d, "student"), safe_serialization=True)
    teacher.save_pretrained(os.path.join(d, "teacher"), safe_serialization=True)
    g = torch.Generator().manual_seed(5)
    windows = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
    windows[:, 0] = 1
    json.dump({"windows": windows.tolist(), "ce_weight": CE_W, "kd_weight": KD_W, "temperature": TEMP,
               "contrastive_weight": CTR_W, "contrastive_temperature": CTR_TAU, "group_size": GROUP, "bits": BITS,
               "clip_init": 1.25},
              open(os.path.join(d, "windows.json"), "w"))
    for case in ("dense", "qat"):
        student.zero_grad()
        run_case(case, student, teacher, windows, cfg, d)


if __name__ == "__main__":
    main()
