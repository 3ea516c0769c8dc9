#!/usr/bin/env python3
"""Writes the Hugging Face reference fixtures that qkd's CPU tests compare against.

Run on the GPU machine, where transformers, torch and sentencepiece are installed:
    python3 tests/gen_hf_fixtures.py --shared <a copy of ../shared/data: models/, corpora/> --out <dir>
Everything written is small and committed under tests/fixtures/hf/.

Fixtures:
  tiny-llama/        a random-initialised LlamaForCausalLM (GQA 4:2, untied embeddings, rope_theta 50000),
                     saved sharded (model.safetensors.index.json) in fp32, with tokens.json and logits.f32
  teacher-25m.json   token ids of a fixed text, argmax of every position, and fp32 logits of three positions
                     (teacher-25m-logits.f32), computed by transformers in fp32
  teacher-25m-eval   the qkd-eval rule computed with transformers on eval.txt (an excerpt of the corpus), ctx 128
  stories260K.json   llama2.c's stories260K converted to HF (q/k rows permuted as Meta->HF conversion does),
                     logits of a fixed token sequence: an independent check of the llama2.c loader and of RoPE
"""
import argparse
import json
import os
import re
import struct

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def write_f32(path, arr):
    np.ascontiguousarray(arr, dtype="<f4").tofile(path)


def tiny_llama(out):
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1: make them non-trivial so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    d = os.path.join(out, "tiny-llama")
    model.save_pretrained(d, max_shard_size="150KB", safe_serialization=True)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    tokens[:, 0] = 1
    with torch.no_grad():
        logits = model(tokens).logits.float().numpy()
    json.dump({"tokens": tokens.tolist(), "shape": list(logits.shape)}, open(os.path.join(d, "tokens.json"), "w"))
    write_f32(os.path.join(d, "logits.f32"), logits)


def split_documents(text):
    # The qkd-eval rule: documents are maximal runs of lines that are not whitespace-only.
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip() == "":
            if cur:
                docs.append("\n".join(cur))
                cur = []
        else:
            cur.append(line)
    if cur:
        docs.append("\n".join(cur))
    return docs


def teacher(shared, out):
    import sentencepiece as spm
    tdir = os.path.join(shared, "models", "teacher-25m")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tdir, "tokenizer.model"))
    model = LlamaForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    text = "once upon a time, there was a little girl named lily. she loved to play outside in the park"
    ids = [1] + sp.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    positions = [0, len(ids) // 2, len(ids) - 1]
    write_f32(os.path.join(out, "teacher-25m-logits.f32"), logits[positions])
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0].tolist()
    json.dump({"text": text, "tokens": ids, "positions": positions, "vocab_size": logits.shape[1],
               "argmax": logits.argmax(-1).tolist(), "greedy_32": gen[len(ids):],
               "greedy_32_text": sp.decode(gen[len(ids):])},
              open(os.path.join(out, "teacher-25m.json"), "w"), indent=1)

    # qkd-eval rule on a small excerpt: BOS + pieces + EOS per document, one stream, non-overlapping windows.
    corpus = open(os.path.join(shared, "corpora", "tinystories", "stories_cased.txt"), encoding="utf-8").read()
    excerpt = "\n\n".join(split_documents(corpus)[:12]) + "\n"
    open(os.path.join(out, "eval.txt"), "w", encoding="utf-8").write(excerpt)
    stream = []
    for doc in split_documents(excerpt):
        stream += [sp.bos_id()] + sp.encode(doc) + [sp.eos_id()]
    ctx, nll, n = 128, 0.0, 0
    for i in range(0, len(stream) - 1, ctx):
        x = stream[i:i + ctx + 1]
        if len(x) < 2:
            break
        with torch.no_grad():
            lg = model(torch.tensor([x[:-1]])).logits[0].double()
        lp = torch.log_softmax(lg, -1)
        nll += -lp[torch.arange(len(x) - 1), torch.tensor(x[1:])].sum().item()
        n += len(x) - 1
    json.dump({"ctx": ctx, "n_tokens": n, "mean_nll": nll / n, "ppl": float(np.exp(nll / n)),
               "stream_len": len(stream), "stream_head": stream[:64]},
              open(os.path.join(out, "teacher-25m-eval.json"), "w"), indent=1)


def stories260k(shared, out):
    # llama2.c legacy checkpoint -> HF, the way Meta->HF conversion permutes q/k for rotate-half RoPE.
    path = os.path.join(shared, "models", "stories260K", "stories260K.bin")
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared_cls = vocab > 0
    vocab = abs(vocab)
    w = np.frombuffer(raw[28:], dtype="<f4")
    hd = dim // n_heads
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = w[off:off + n].reshape(shape)
        off += n
        return torch.tensor(a.copy())

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, n_kv * hd, dim)
    wv = take(n_layers, n_kv * hd, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    off += seq_len * hd  # freq_cis_real and freq_cis_imag, seq_len * hd/2 each
    wcls = emb if shared_cls else take(vocab, dim)

    def permute(t, heads):
        return t.view(heads, t.shape[0] // heads // 2, 2, t.shape[1]).transpose(1, 2).reshape(t.shape)

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared_cls)
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": wcls}
    for l in range(n_layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = rms_att[l]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[l]
        sd[p + "self_attn.q_proj.weight"] = permute(wq[l], n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(wk[l], n_kv)
        sd[p + "self_attn.v_proj.weight"] = wv[l]
        sd[p + "self_attn.o_proj.weight"] = wo[l]
        sd[p + "mlp.gate_proj.weight"] = w1[l]
        sd[p + "mlp.down_proj.weight"] = w2[l]
        sd[p + "mlp.up_proj.weight"] = w3[l]
    model.load_state_dict(sd, strict=False)
    g = torch.Generator().manual_seed(3)
    ids = [1] + torch.randint(3, vocab, (20,), generator=g).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        gen = model.generate(torch.tensor([[1]]), max_new_tokens=64, do_sample=False)[0].tolist()
    write_f32(os.path.join(out, "stories260K-logits.f32"), logits)
    json.dump({"tokens": ids, "shape": list(logits.shape), "greedy_64_from_bos": gen[1:]},
              open(os.path.join(out, "stories260K.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", required=True, help="../shared/data or a copy: models/teacher-25m, models/stories260K, corpora/tinystories")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    tiny_llama(a.out)
    teacher(a.shared, a.out)
    stories260k(a.shared, a.out)
    print("fixtures written to", a.out)
    for root, _, files in os.walk(a.out):
        for f in files:
            print(f"{os.path.getsize(os.path.join(root, f)):>9}  {os.path.relpath(os.path.join(root, f), a.out)}")


if __name__ == "__main__":
    main()
