#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/llama2_sp.json: the reference ids and decodes of the LLaMA-2 sentencepiece
tokenizer for a fixed set of strings, computed by the Python sentencepiece library (the C++ tests must not need
Python, so its answers are committed).

    pip install sentencepiece
    python3 tests/gen_tokenizer_fixtures.py [--shared ../shared/data]

Ids are encoded without BOS/EOS (sp.encode(text)); "decoded" is sp.decode(ids), which for LLaMA drops the
leading space that the dummy prefix added.
"""
import argparse
import json
import os

import sentencepiece as spm

# Each entry exercises one thing a tokenizer can get wrong; together they cover the scripts and whitespace the
# chat app will meet.
STRINGS = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  Hello   world  ",
    "Hello,\tworld!\n",
    "line one\nline two\r\nline three",
    "Once upon a time, there was a little girl named Lily.",
    "She said, \"Don't do that!\" and ran away.",
    "It's 3:45pm on 2023-07-18; the price is $1,234.56 (approx.).",
    "0",
    "1234567890",
    "3.14159265358979",
    "a1b2c3 d4e5f6",
    "café naïve résumé coöperate",
    "Ångström über Straße",
    "Привет, мир! Как дела?",
    "Съешь же ещё этих мягких французских булок.",
    "日本語のテキストです。",
    "中文分词测试：你好，世界！",
    "한국어 문장입니다",
    "Ελληνικά γράμματα",
    "שלום עולם",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "emoji 😀 smile",
    "🚀🌍✨",
    "family 👨‍👩‍👧 zwj",
    "flags 🇫🇷🇩🇪",
    "math ∑ x² ≤ ∞ ≠ π",
    "tabs\tand\tmore\t\ttabs",
    "    indented code()",
    "def f(x):\n    return x * 2\n",
    "<s> literal angle tokens </s>",
    "[INST] What is 2+2? [/INST]",
    "Mixed UPPER lower CamelCase snake_case kebab-case",
    "trailing spaces   ",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth space",
    "a\u0301 combining accent",
    "!!!???...,,,;;;",
    "http://example.com/path?query=1&b=2#frag",
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(here, "fixtures", "tokenizer", "llama2_sp.json"))
    args = ap.parse_args()

    model = "tokenizers/llama2/tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.shared, model))
    cases = []
    for text in STRINGS:
        ids = sp.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": sp.decode(ids)})
    doc = {
        "generator": "tests/gen_tokenizer_fixtures.py",
        "sentencepiece_version": spm.__version__,
        "model": model,
        "encode": "sp.encode(text): no BOS, no EOS",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # One case a line keeps the committed file readable and its diffs small.
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(lines))
        f.write("\n]}\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
