#!/usr/bin/env python3
"""Writes tests/tokenizer/data/qwen3_golden.json: texts and the ids Hugging Face `tokenizers`
gives for them with the real Qwen3 tokenizer.json in ../shared/assets/qwen3-tokenizer.

The golden ids come from an independent implementation, never from our own code. Run once
(and again only when the text set changes); the output is committed:

    python3 scripts/make-tokenizer-golden.py

It creates .venv (ignored by git) with a pinned `tokenizers` wheel from PyPI on first use
and re-executes itself inside it.
"""
import json
import os
import random
import subprocess
import sys

TOKENIZERS_VERSION = "0.22.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
SHARED = os.path.join(ROOT, "..", "shared", "assets")
TOKENIZER_JSON = os.path.join(SHARED, "qwen3-tokenizer", "tokenizer.json")
VOCAB_TEST_INP = os.path.join(SHARED, "vocab-tests", "ggml-vocab-qwen2.gguf.inp")
OUT = os.path.join(ROOT, "tests", "tokenizer", "data", "qwen3_golden.json")


def ensure_venv():
    """Re-runs this script inside .venv with the pinned tokenizers, creating it if needed."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(VENV_PY):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    subprocess.check_call([VENV_PY, "-m", "pip", "install", "--quiet",
                           f"tokenizers=={TOKENIZERS_VERSION}"])
    os.execv(VENV_PY, [VENV_PY] + sys.argv)


FIXED_TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "Hello, World! How are you doing today?",
    "I'm sure you'll see they've done it. WE'LL SEE, DON'T WORRY. It'S fine",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "for (let i = 0; i < arr.length; ++i) { sum += arr[i] ** 2; } // done",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "    x = {'a': [1, 2, 3], \"b\": None}  # comment\r\n\r\n",
    # CJK, other scripts
    "我想在apple工作1314151天～",
    "日本語のテキストとカタカナ、ひらがな。漢字も含みます。",
    "한국어 문장입니다. 안녕하세요!",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ภาษาไทยไม่มีช่องว่าง",
    "Ελληνικά γράμματα και ΑΡΙΘΜΟΙ",
    "Cửa Việt, Tiếng Việt có dấu",
    # emoji (incl. ZWJ sequences, flags, skin tones)
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 👍🏽 🇩🇪 👨‍👩‍👧‍👦",
    "🦙🦙🦙 llama.cpp 🤗",
    # numbers
    "3 33 333 3333 33333 333333 3333333 33333333",
    "3.14159265358979323846 1e-10 -42 +7 0x1F 1,000,000 12:30",
    "٣٤٥ ⅻ ½ ² ①②③",
    # whitespace runs
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d\t\te\n\nf\n\n\n g \u00a0h\u3000i",
    "\n\n\n",
    "\t",
    " ",
    "  ",
    "line one\r\nline two\rline three\u2028line four\u0085line five",
    "x\u200bzero\u200dwidth\ufeffbom",
    # which characters count as whitespace (\\s) in the pre-tokenizer regex
    "hello\x85\x85world",
    "a \x85\x85 b",
    "x\u3000\u3000y x\u2028\u2028y x\u00a0\u00a0y x\u2009\u2009y x\u202f\u202fy",
    "x\u200b\u200by x\u180e\u180ey x\x1c\x1cy x\x1f\x1fy x\x0b\x0cy",
    # case-insensitive contractions and Unicode case folding
    "it'\u017f it'\u212a IT'S it'S",
    # NFC: decomposed input must be composed first
    "e\u0301 a\u0308 o\u0302 Ä \u212b Å",
    "\u1100\u1161\u11a8",
    # added and special tokens
    "<think>",
    "</think>",
    "<think>\nLet me think about this.\n</think>\n\nThe answer is 42.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|><|endoftext|>",
    "text<think>no spaces</think>text",
    " <think> spaced </think> ",
    "<<think>> <|im_start <|im_start|| <think</think>>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    # punctuation and contractions
    "!!!!!! ??? ... --- === ''' ``` \"\"\"",
    "' era 'tis 'RE 'Ve 'lL y'all",
    "https://example.com/path?query=1&b=2#frag user@example.org",
    "$100.00 €50 £20 ¥1000 100% 50°C",
    "a" * 300,
    "supercalifragilisticexpialidocious " * 5,
]


def random_texts(seed, count):
    """Random strings over many scripts, whitespace, digits and the added tokens."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r  \u00a0",
        ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`",
        "äöüßéèêçñÅØæœ",
        "абвгдежзийклмнопрстуфхцчшщъыьэюя",
        "你好世界中文字符测试学习机器",
        "あいうえおカタカナ",
        "가나다라마바사",
        "😀😁🤔🚀🦙👍🏽✅🇩🇪",
        "\u0301\u0308\u200d\u200b",
    ]
    specials = ["<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>"]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.05:
                parts.append(rng.choice(specials))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def vocab_test_texts():
    with open(VOCAB_TEST_INP, encoding="utf-8") as f:
        raw = f.read()
    texts = raw.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == "", "the .inp file ends with a separator"
    return texts[:-1]


def main():
    ensure_venv()
    import tokenizers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER_JSON)
    texts = FIXED_TEXTS + vocab_test_texts() + random_texts(seed=20250101, count=60)
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": decoded})
    doc = {
        "generator": f"scripts/make-tokenizer-golden.py with tokenizers=={tokenizers.__version__}",
        "tokenizer": "../shared/assets/qwen3-tokenizer/tokenizer.json",
        "add_special_tokens": False,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    # One case per line keeps the file small and its diffs readable.
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(head[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=True) for c in cases))
        f.write("\n]}\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
