#!/usr/bin/env python3
"""Writes the GGUF fixtures of tests/test_gguf.cpp into tests/fixtures/gguf/ with the `gguf` Python package
(llama.cpp's own gguf-py), so that qkd's reader is checked against an independent writer and dequantizer.

  types.gguf            one tensor of each supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1; 1-D to 3-D),
                        metadata of every value type (nested arrays too), general.alignment = 64
  types.expected.json   each tensor's shapes and values as gguf.quants.dequantize gives them
  tiny-llama.gguf       a 2-layer llama model (random weights, mixed tensor types, untied output) with a small
                        byte-level BPE vocabulary; tiny-llama-tied.gguf: 1 layer, tied embeddings
  tiny-llama.expected.json  config, per-tensor sums and sample values from gguf.quants.dequantize, and token
                        ids the `tokenizers` library gives for the tiny vocabulary

Run from the repository root:  pip install gguf numpy tokenizers && python3 tests/gen_gguf_fixtures.py
"""
import json
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

OUT = Path("tests/fixtures/gguf")
rng = np.random.default_rng(20240611)


def f32list(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


def make_values(rows, cols):
    x = rng.normal(0.0, 1.0, size=(rows, cols)).astype(np.float32)
    # Blocks that exercise the corners of the block formats: all zero, constant, one large outlier.
    if cols >= 64:
        x[0, :32] = 0.0
        x[1 % rows, 32:64] = 0.75
        x[rows - 1, 5] = 40.0
    return x


def add(writer, name, data, qtype):
    """Adds data quantized to qtype; returns gguf's own dequantization of the stored bytes."""
    if qtype == QT.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return data.astype(np.float32)
    if qtype == QT.F16:
        h = data.astype(np.float16)
        writer.add_tensor(name, h)
        return h.astype(np.float32)
    q = quants.quantize(data, qtype)
    writer.add_tensor(name, q, raw_dtype=qtype)
    return quants.dequantize(q, qtype).reshape(data.shape).astype(np.float32)


def write_types():
    path = OUT / "types.gguf"
    w = gguf.GGUFWriter(str(path), arch="test")
    w.add_custom_alignment(64)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 65000)
    w.add_int16("test.i16", -32000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.15625)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "h\u00e9llo \u2581 world")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.5e-300)
    w.add_array("test.array.i32", [1, -2, 3])
    w.add_array("test.array.f32", [0.5, -1.25])
    w.add_array("test.array.str", ["a", "", "\u00fcber"])
    w.add_array("test.array.bool", [True, False, True])
    w.add_array("test.array.nested", [[1, 2], [3, 4, 5]])
    tensors = [
        ("vec_f32", (7,), QT.F32),
        ("mat_f32", (2, 5), QT.F32),
        ("mat_f16", (3, 40), QT.F16),
        ("mat_bf16", (3, 40), QT.BF16),
        ("mat_q8_0", (4, 64), QT.Q8_0),
        ("mat_q4_0", (4, 64), QT.Q4_0),
        ("mat_q4_1", (4, 96), QT.Q4_1),
        ("cube_q8_0", (2, 3, 32), QT.Q8_0),
    ]
    expected = []
    for name, shape, qt in tensors:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = make_values(rows, shape[-1]).reshape(shape)
        deq = add(w, name, data, qt)
        expected.append({"name": name, "type": qt.name, "shape": list(shape), "ne": list(reversed(shape)),
                         "values": f32list(deq)})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (OUT / "types.expected.json").write_text(json.dumps({"tensors": expected}, indent=0) + "\n")
    return path


# A byte-level vocabulary: the 256 byte characters, a few merges, and chat control tokens.
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "\u0120wor l", "\u0120worl d", "1 2"]
    tokens = specials + byte_chars
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny(path, n_layers, tied, types_by_layer):
    dim, n_heads, n_kv, ffn = 32, 4, 2, 64
    head_dim = dim // n_heads
    tokens, ttypes, merges = tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("qkd tiny test model")
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(SMOL_TEMPLATE)
    stats = {}

    def put(name, shape, qt):
        data = make_values(shape[0], shape[1]) * 0.1 if len(shape) == 2 else 1.0 + 0.1 * make_values(1, shape[0])[0]
        deq = add(w, name, data, qt).reshape(-1).astype(np.float64)
        stats[name] = {"type": qt.name, "shape": list(shape), "sum": float(deq.sum()),
                       "sum_sq": float((deq * deq).sum()), "head": f32list(deq[:4]), "tail": f32list(deq[-4:])}

    put("token_embd.weight", (vocab, dim), QT.Q8_0)
    for l in range(n_layers):
        t = types_by_layer[l % len(types_by_layer)]
        put(f"blk.{l}.attn_norm.weight", (dim,), QT.F32)
        put(f"blk.{l}.attn_q.weight", (n_heads * head_dim, dim), t[0])
        put(f"blk.{l}.attn_k.weight", (n_kv * head_dim, dim), t[1])
        put(f"blk.{l}.attn_v.weight", (n_kv * head_dim, dim), t[2])
        put(f"blk.{l}.attn_output.weight", (dim, n_heads * head_dim), t[3])
        put(f"blk.{l}.ffn_norm.weight", (dim,), QT.F32)
        put(f"blk.{l}.ffn_gate.weight", (ffn, dim), t[4])
        put(f"blk.{l}.ffn_up.weight", (ffn, dim), t[5])
        put(f"blk.{l}.ffn_down.weight", (dim, ffn), t[6])
    put("output_norm.weight", (dim,), QT.F32)
    if not tied:
        put("output.weight", (vocab, dim), QT.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
              "ffn_dim": ffn, "vocab_size": vocab, "max_seq_len": 256, "rope_theta": 50000.0, "norm_eps": 1e-6,
              "tied": tied}
    return {"config": config, "tensors": stats}


def tiny_encodings():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tokens, ttypes, merges = tiny_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, ttypes) if ty == 3])
    texts = ["hello world", "hello  world 123", "<|im_start|>user\nhello<|im_end|>", "h\u00e9llo \U0001F600"]
    return [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write_types()
    mixed = [(QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.Q4_1, QT.Q4_0, QT.BF16),
             (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.BF16, QT.Q4_0, QT.Q4_1, QT.F32)]
    tiny = write_tiny(OUT / "tiny-llama.gguf", 2, False, mixed)
    tied = write_tiny(OUT / "tiny-llama-tied.gguf", 1, True, mixed[1:])
    tiny["tied"] = tied
    tiny["encodings"] = tiny_encodings()
    (OUT / "tiny-llama.expected.json").write_text(json.dumps(tiny, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{OUT}: {total} bytes in {len(list(OUT.iterdir()))} files")


if __name__ == "__main__":
    main()
