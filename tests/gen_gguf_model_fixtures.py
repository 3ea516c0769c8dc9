#!/usr/bin/env python3
"""Reference logits and greedy continuations of GGUF models, from the `gguf` package and Hugging Face
transformers, for tests/test_gguf_models.cpp. Run on the GPU machine (fp32, TF32 off), or anywhere with torch.

For each model given as NAME=PATH it writes into OUTDIR (default tests/fixtures/gguf-models):
  NAME.json        the file's size and sha256, the config read from its metadata, the tensor types, the prompt
                   (messages and rendered text for a chat model, and the token ids), the 32 greedy token ids
                   and each step's top-1/top-2 margin, and which positions NAME.logits.f32 holds
  NAME.logits.f32  little-endian fp32 logits [positions, vocab]: every prompt position when that is small,
                   else the last one

The reference is independent of qkd: every tensor is dequantized by gguf.quants.dequantize (the gguf package's
own implementation of F32/F16/BF16/Q8_0/Q4_0/Q4_1), the rows of attn_q/attn_k are put back from llama.cpp's
RoPE order into Hugging Face's (the inverse of llama.cpp's convert_hf_to_gguf permute), and the tensors are
loaded with strict key checking into transformers' LlamaForCausalLM built from the GGUF hyperparameters.
A chat model (tokenizer.ggml.model = gpt2 with a chat template) gets a fixed conversation, rendered by
transformers' apply_chat_template with the file's own template and encoded by Hugging Face `tokenizers`
built from the file's vocabulary and merges (as tests/gen_bpe_fixtures.py does). Other models get a fixed
list of ids.

Greedy decoding runs exactly 32 steps and ignores end-of-turn tokens, so that both sides compare 32 tokens.

  python3 tests/gen_gguf_model_fixtures.py [--out DIR] smollm2=~/.cache/qkd/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_bpe_fixtures import field_value, reference  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STEPS = 32
MAX_STORED_FLOATS = 1 << 20


def unpermute(w, n_head):
    """Inverse of llama.cpp's permute(): GGUF's interleaved RoPE rows -> Hugging Face's half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_model(path):
    r = gguf.GGUFReader(path)
    g = lambda k, d=None: field_value(r, k) if k in r.fields else d
    arch = g("general.architecture")
    if arch != "llama":
        sys.exit(f"{path}: general.architecture is {arch!r}, not llama")
    cfg = dict(
        dim=int(g("llama.embedding_length")),
        n_layers=int(g("llama.block_count")),
        n_heads=int(g("llama.attention.head_count")),
        n_kv_heads=int(g("llama.attention.head_count_kv", g("llama.attention.head_count"))),
        ffn_dim=int(g("llama.feed_forward_length")),
        norm_eps=float(g("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(g("llama.rope.freq_base", 10000.0)),
        ctx=int(g("llama.context_length")),
    )
    tensors, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        tensors[t.name] = a
        types[t.name] = t.tensor_type.name
    cfg["vocab_size"] = int(tensors["token_embd.weight"].shape[0])
    cfg["head_dim"] = cfg["dim"] // cfg["n_heads"]
    cfg["tied"] = "output.weight" not in tensors
    return r, g, cfg, tensors, types


def hf_state_dict(cfg, tensors):
    import torch
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    sd = {}
    for name, a in tensors.items():
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind not in per_layer:
                sys.exit(f"unexpected tensor {name}")
            key = f"model.layers.{layer}.{per_layer[kind]}.weight"
            if kind == "attn_q":
                a = unpermute(a, cfg["n_heads"])
            elif kind == "attn_k":
                a = unpermute(a, cfg["n_kv_heads"])
        else:
            sys.exit(f"unexpected tensor {name}")
        sd[key] = torch.from_numpy(np.ascontiguousarray(a))
    return sd


def build_model(cfg, tensors, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn_dim"],
                     num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                     num_key_value_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"],
                     max_position_embeddings=cfg["ctx"], rms_norm_eps=cfg["norm_eps"],
                     rope_theta=cfg["rope_theta"], tie_word_embeddings=cfg["tied"], attention_bias=False,
                     mlp_bias=False, hidden_act="silu", attn_implementation="eager")
    model = LlamaForCausalLM(hc).to(torch.float32)
    missing, unexpected = model.load_state_dict(hf_state_dict(cfg, tensors), strict=False)
    allowed_missing = {"lm_head.weight"} if cfg["tied"] else set()
    if set(missing) != allowed_missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg["tied"]:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    # the rope base must be what the file says, whichever way this transformers version stores it
    inv = model.model.rotary_emb.inv_freq.double().cpu()
    want = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, cfg["head_dim"], 2, dtype=torch.float64) / cfg["head_dim"]))
    assert torch.allclose(inv, want, rtol=1e-6), "rope_theta did not reach the rotary embedding"
    return model.to(device).eval()


def prompt_of(g, ids_arg):
    template = g("tokenizer.chat_template")
    if g("tokenizer.ggml.model") == "gpt2" and template:
        from transformers import PreTrainedTokenizerFast
        tokens, types = g("tokenizer.ggml.tokens"), g("tokenizer.ggml.token_type")
        merges = g("tokenizer.ggml.merges")
        tok = PreTrainedTokenizerFast(tokenizer_object=reference(tokens, types, merges, with_specials=True))
        tok.chat_template = template
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return {"messages": MESSAGES, "text": text, "ids": ids}
    return {"ids": ids_arg}


def text_of(g, ids):
    """The text of ids as Hugging Face decodes it: byte-level, control tokens left out."""
    from tokenizers import decoders
    tok = reference(g("tokenizer.ggml.tokens"), g("tokenizer.ggml.token_type"), g("tokenizer.ggml.merges"),
                    with_specials=True)
    tok.decoder = decoders.ByteLevel()
    return tok.decode(ids, skip_special_tokens=True)


def retext(out, spec):
    """--retext: recompute only greedy_text of an existing NAME.json from its ids (no torch needed)."""
    name, path = spec.split("=", 1)
    r = gguf.GGUFReader(os.path.expanduser(path))
    g = lambda k, d=None: field_value(r, k) if k in r.fields else d
    p = out / f"{name}.json"
    entry = json.loads(p.read_text())
    entry["greedy_text"] = text_of(g, entry["greedy_ids"])
    p.write_text(json.dumps(entry, indent=1) + "\n")
    print(f"{name}: {entry['greedy_text']!r}")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/gguf-models")
    ap.add_argument("--ids", default="1,9,30,74,120,7,255,43,12,88,3,66,200,17,5,101",
                    help="prompt ids for models without a chat template")
    ap.add_argument("--retext", action="store_true", help="only recompute greedy_text of existing fixtures")
    ap.add_argument("models", nargs="+", help="NAME=PATH.gguf")
    args = ap.parse_args()
    if args.retext:
        for spec in args.models:
            retext(Path(args.out), spec)
        return
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        name, path = spec.split("=", 1)
        path = os.path.expanduser(path)
        r, g, cfg, tensors, types = read_model(path)
        model = build_model(cfg, tensors, device)
        prompt = prompt_of(g, [int(x) % cfg["vocab_size"] for x in args.ids.split(",")])
        ids = list(prompt["ids"])
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu()
            positions = list(range(len(ids))) if logits.numel() <= MAX_STORED_FLOATS else [len(ids) - 1]
            logits[positions].numpy().astype("<f4").tofile(out / f"{name}.logits.f32")
            seq, greedy, margins = list(ids), [], []
            for _ in range(STEPS):  # full recompute each step: no KV-cache code path in the reference
                last = model(torch.tensor([seq], device=device)).logits[0, -1].double().cpu()
                top2 = torch.topk(last, 2)
                greedy.append(int(top2.indices[0]))
                margins.append(float(top2.values[0] - top2.values[1]))
                seq.append(greedy[-1])
        entry = {
            "file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": sha256(path),
            "reference": f"gguf {importlib.metadata.version('gguf')} dequantize + "
                         f"transformers LlamaForCausalLM fp32 eager on {device} "
                         f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch {torch.__version__}",
            "config": cfg, "tensor_types": types, "prompt": prompt, "logits_positions": positions,
            "greedy_ids": greedy, "greedy_margins": margins,
        }
        if g("tokenizer.ggml.model") == "gpt2":
            entry["greedy_text"] = text_of(g, greedy)
        (out / f"{name}.json").write_text(json.dumps(entry, indent=1) + "\n")
        print(f"{name}: {len(ids)} prompt ids, greedy {greedy[:8]}..., min margin {min(margins):.4f}, "
              f"logits {len(positions)}x{cfg['vocab_size']}")


if __name__ == "__main__":
    main()
