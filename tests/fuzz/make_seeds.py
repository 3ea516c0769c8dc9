#!/usr/bin/env python3
"""Writes the fuzz harnesses' seed corpora (tests/fuzz/corpus/<harness>/): small valid files of every kind.

    python3 tests/fuzz/make_seeds.py BUILD_DIR     # BUILD_DIR/bin/qkd-quantize writes the int4 seeds

Files the tests already carry (tests/fixtures) are copied; llama2.c checkpoints and tokenizers, HF configs, a
safetensors file of every dtype and a GGUF SentencePiece vocabulary are written here; the int4 checkpoints come
from qkd's own writer (qkd-quantize) run on the llama2.c seeds. Deterministic: run again, same bytes.
"""
import json, os, shutil, struct, subprocess, sys, tempfile

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
corpus = os.path.join(root, "tests", "fuzz", "corpus")


def out(harness, name, data):
    d = os.path.join(corpus, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(path):
    with open(os.path.join(root, "tests", "fixtures", path), "rb") as f:
        return f.read()


def floats(n, seed):
    # a fixed pseudo-random sequence, small values
    x, vals = seed, []
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**31
        vals.append((x % 2001 - 1000) / 8000.0)
    return struct.pack(f"<{n}f", *vals)


def llama2c(dim, hidden, layers, heads, kv, vocab, seq, shared, version):
    hd = dim // heads
    sizes = dict(emb=vocab * dim, att=layers * dim, wq=layers * dim * dim, wk=layers * kv * hd * dim,
                 wv=layers * kv * hd * dim, wo=layers * dim * dim, ffn=layers * dim, w1=layers * hidden * dim,
                 w2=layers * dim * hidden, w3=layers * hidden * dim, norm=dim)
    if version == 0:
        head = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq)
        order = ["emb", "att", "wq", "wk", "wv", "wo", "ffn", "w1", "w2", "w3", "norm"]
        body = b"".join(floats(sizes[k], i) for i, k in enumerate(order))
        body += floats(seq * hd // 2, 90) + floats(seq * hd // 2, 91)
    else:
        head = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, layers, heads, kv, vocab, seq, int(shared))
        head += b"\0" * (256 - len(head))
        order = ["att", "ffn", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
        body = b"".join(floats(sizes[k], i) for i, k in enumerate(order))
    if not shared:
        body += floats(vocab * dim, 99)
    return head + body


def tokenizer_bin(pieces):
    data = struct.pack("<i", max(len(p.encode()) for _, p in pieces))
    for score, p in pieces:
        b = p.encode()
        data += struct.pack("<fi", score, len(b)) + b
    return data


# GGUF, just what a vocabulary needs: metadata only, no tensors.
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, value):
    enc = {4: "<I", 5: "<i", 6: "<f", 7: "<?"}
    data = gguf_string(key) + struct.pack("<I", vtype)
    if vtype == 8:
        return data + gguf_string(value)
    if vtype == 9:
        etype, items = value
        data += struct.pack("<IQ", etype, len(items))
        return data + b"".join(gguf_string(v) if etype == 8 else struct.pack(enc[etype], v) for v in items)
    return data + struct.pack(enc[vtype], value)


def gguf(kvs):
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(gguf_kv(*kv) for kv in kvs)


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "build")
    shutil.rmtree(corpus, ignore_errors=True)

    # safetensors: a shard of the HF fixture, and one tensor of each dtype with metadata
    out("safetensors", "tiny-llama-shard3.safetensors", fixture("hf/tiny-llama/model-00003-of-00003.safetensors"))
    tensors = [("a.f32", "F32", [2, 3], floats(6, 1)), ("b.f16", "F16", [4], b"\x00\x3c" * 4),
               ("c.bf16", "BF16", [2, 2], b"\x80\x3f" * 4), ("d.i32", "I32", [3], struct.pack("<3i", 1, -2, 3)),
               ("e.empty", "F32", [0, 4], b"")]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    out("safetensors", "dtypes.safetensors", struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors))

    # HF config.json
    out("hf_config", "tiny-llama.json", fixture("hf/tiny-llama/config.json"))
    base = json.loads(fixture("hf/tiny-llama/config.json"))
    variants = {
        "llama3-scaling.json": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        "linear-scaling.json": {"rope_scaling": {"type": "linear", "factor": 2.0}},
        "rope-parameters.json": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        "eos-list-head-dim.json": {"eos_token_id": [2, 7], "head_dim": 32, "num_key_value_heads": 1},
    }
    for name, change in variants.items():
        c = dict(base)
        c.pop("rope_theta", None) if "rope_parameters" in change else None
        c.update(change)
        out("hf_config", name, json.dumps(c, indent=1).encode())

    # llama2.c checkpoints, both versions, shared and separate classifier
    work = tempfile.mkdtemp()
    for version in (0, 1):
        for shared in (True, False):
            out("llama2c", f"v{version}-{'shared' if shared else 'wcls'}.bin",
                llama2c(8, 16, 1, 2, 1, 6, 4, shared, version))

    # llama2.c tokenizer.bin: the control pieces, all 256 byte pieces, then merges; and one without byte pieces
    pieces = [(0.0, "<unk>"), (0.0, "\n<s>\n"), (0.0, "\n</s>\n")] + [(0.0, f"<0x{b:02X}>") for b in range(256)]
    words = [" ", "a", "n", "o", "e", "on", " o", "ce", " on", "nce", " once", "é", "日本", "🙂", "up", " upon"]
    pieces += [(-float(i), w) for i, w in enumerate(words)]
    out("llama2c_tokenizer", "bytes-and-merges.bin", tokenizer_bin(pieces))
    out("llama2c_tokenizer", "no-byte-pieces.bin",
        tokenizer_bin([(0.0, "<unk>"), (0.0, "\n<s>\n"), (0.0, "\n</s>\n"), (-1.0, " "), (-2.0, "a"), (-3.0, " a")]))

    # GGUF models (fixtures written by the gguf package) and vocabularies
    for name in ("types.gguf", "tiny-llama-tied.gguf", "tiny-llama.gguf"):
        out("gguf", name, fixture("gguf/" + name))
    out("gguf_tokenizer", "tiny-llama-bpe.gguf", fixture("gguf/tiny-llama-tied.gguf"))
    spm = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
          ["\u2581", "a", "n", "\u2581a", "on", "\u2581on", "ce", "\u2581once", "<|im_end|>", "[INST]"]
    types = [2, 3, 3] + [6] * 256 + [1] * 8 + [3, 4]
    out("gguf_tokenizer", "llama-spm.gguf", gguf([
        ("general.architecture", 8, "llama"),
        ("tokenizer.ggml.model", 8, "llama"),
        ("tokenizer.ggml.tokens", 9, (8, spm)),
        ("tokenizer.ggml.scores", 9, (6, [0.0] * 259 + [-float(i) for i in range(10)])),
        ("tokenizer.ggml.token_type", 9, (5, types)),
        ("tokenizer.ggml.bos_token_id", 4, 1),
        ("tokenizer.ggml.eos_token_id", 4, 2),
        ("tokenizer.ggml.unknown_token_id", 4, 0),
        ("tokenizer.ggml.add_bos_token", 7, True),
        ("tokenizer.chat_template", 8, "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                                       "{{ message['content'] }}<|im_end|>\n{% endfor %}"),
    ]))

    # qkd int4 checkpoints from qkd's own writer: the llama2.c model at dim 32 (int4 needs k % 32 == 0)
    src = os.path.join(work, "model.bin")
    with open(src, "wb") as f:
        f.write(llama2c(32, 32, 1, 2, 1, 6, 4, False, 1))
    quantize = os.path.join(build, "bin", "qkd-quantize")
    for name, flags in (("g32-sym-bf16", ["--group-size", "32", "--sym"]),
                        ("g32-asym-fp16", ["--group-size", "32", "--asym", "--scale-type", "fp16"]),
                        ("channel-embed", ["--group-size", "channel", "--quantize-embeddings", "--quantize-lm-head"])):
        dst = os.path.join(work, name)
        subprocess.run([quantize, "-m", src, "-o", dst] + flags, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(os.path.join(dst, "model.safetensors"), "rb") as f:
            out("int4_checkpoint", name + ".safetensors", f.read())
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
