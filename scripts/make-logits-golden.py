#!/usr/bin/env python3
"""Writes tests/model/data/<model>_golden.json: logits and greedy continuations of the real
GGUF checkpoints of scripts/fetch-models.sh (SmolLM2-135M-Instruct Q4_1, and the smaller
Qwen2.5-Coder when present) computed by an independent implementation, llama.cpp itself
through llama-cpp-python (pinned below), so that the C++ test
(tests/model/test_golden_smollm2.cpp) compares our dense forward with it.

Run once, then commit the JSON files:   python3 scripts/make-logits-golden.py [NAME...]
(NAME: smollm2-135m, qwen2.5-coder-0.5b; default: those whose file is in the cache).
Without llama-cpp-python at the pinned version it makes a virtual environment for it
(default /tmp/multipole-venv-logits, or $MULTIPOLE_TOOLS_VENV) and re-runs itself there.
PyPI has only the source distribution: pip builds llama.cpp with CMake (about 30-40 minutes
on a 2-core machine; set CMAKE_BUILD_PARALLEL_LEVEL to use more cores).

What is recorded, per prompt (token ids from llama.cpp's own tokenizer, stored so that the
C++ test does not depend on ours):
  - at a few positions, the top 16 logits (id, value) and the logit of a few fixed ids;
  - from the prompt, 64 greedy tokens (llama.cpp argmax, fed back one at a time) with the
    margin between the top two logits at each step (near ties tell the test where an
    implementation with different rounding may legitimately part ways).
llama.cpp settings: F16 KV cache (its default, as ours), no flash attention, one sequence,
n_ctx 1024, and its own CPU kernels (activations quantised to Q8_1/Q8_0 for the quantised
matrix products, as ours quantise to int8 blocks of 32).
"""
import json
import os
import sys

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
NUMPY_VERSION = "2.4.6"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "model", "data")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    # A chat turn in SmolLM2's ChatML template (special tokens parsed).
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the boiling point of water at sea level? Explain briefly.<|im_end|>\n"
    "<|im_start|>assistant\n",
    # Long enough to cross several KV pages and the 8K model's short-context regime.
    "In the beginning of the nineteenth century, the small town by the river was known for its mills. "
    "Every morning the workers walked along the stone bridge, and every evening they returned, tired "
    "but cheerful, to their families. One winter, however, the river froze completely, and",
]
QWEN_PROMPTS = [
    PROMPTS[1],
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a Python function that checks whether a number is prime.<|im_end|>\n"
    "<|im_start|>assistant\n",
]
# name -> (file in the model cache, output file, prompts, greedy tokens, fixed ids)
MODELS = {
    "smollm2-135m": ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_golden.json", PROMPTS, 64,
                     [0, 1, 2, 100, 1000, 10000, 30000, 49151]),
    # Fewer prompts and tokens: the test runs a 0.5B model in CI.
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf", "qwen2.5-coder-0.5b_golden.json",
                           QWEN_PROMPTS, 32, [0, 1, 100, 1000, 10000, 100000, 151643, 151645]),
}
TOP = 16


def ensure_env():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_cpp_env
    # Plain AVX2 build, no network features: only the library is needed.
    llama_cpp_env.ensure(LLAMA_CPP_PYTHON_VERSION, [f"numpy=={NUMPY_VERSION}"],
                         os.environ.get("MULTIPOLE_TOOLS_VENV", "/tmp/multipole-venv-logits"),
                         "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF "
                         "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                         "-DLLAMA_BUILD_SERVER=OFF")


def make(name, cache):
    import hashlib
    import numpy as np
    from llama_cpp import Llama

    file, out_name, prompts, greedy_tokens, fixed_ids = MODELS[name]
    model = os.path.join(cache, file)
    llm = Llama(model_path=model, n_ctx=1024, n_batch=1024, n_ubatch=1024, n_threads=2, logits_all=True,
                flash_attn=False, verbose=False, seed=0)
    cases = []
    for text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        positions = sorted(set([0, len(ids) // 2, len(ids) - 1]))
        at = []
        for p in positions:
            row = scores[p]
            top = np.argsort(-row, kind="stable")[:TOP]
            at.append({"position": int(p),
                       "top": [[int(i), float(row[i])] for i in top],
                       "fixed": [[i, float(row[i])] for i in fixed_ids],
                       "logsumexp": float(np.log(np.sum(np.exp(row - row.max()))) + row.max())})
        # Greedy continuation, fed back one token at a time.
        greedy, margins = [], []
        row = scores[len(ids) - 1]
        for _ in range(greedy_tokens):
            order = np.argsort(-row, kind="stable")[:2]
            greedy.append(int(order[0]))
            margins.append(float(row[order[0]] - row[order[1]]))
            llm.eval([int(order[0])])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        cases.append({"text": text, "ids": [int(i) for i in ids], "positions": at, "greedy": greedy,
                      "greedy_margins": margins})
        print(f"{name}: prompt of {len(ids)} tokens: greedy {llm.detokenize(greedy).decode('utf-8', 'replace')!r}",
              file=sys.stderr)
    sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
    out = {"model": file, "model_sha256": sha,
           "generator": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (llama.cpp CPU, F16 KV cache, no flash attention)",
           "command": f"python3 scripts/make-logits-golden.py {name}", "cases": cases}
    path = os.path.join(DATA, out_name)
    os.makedirs(DATA, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def main():
    ensure_env()
    cache = os.environ.get("MULTIPOLE_MODEL_CACHE", os.path.join(ROOT, ".cache", "models"))
    names = sys.argv[1:] or [n for n, m in MODELS.items() if os.path.exists(os.path.join(cache, m[0]))]
    for name in names:
        if name not in MODELS:
            sys.exit(f"unknown model '{name}' (known: {', '.join(MODELS)})")
        if not os.path.exists(os.path.join(cache, MODELS[name][0])):
            sys.exit(f"{MODELS[name][0]}: not in {cache} (run scripts/fetch-models.sh {name})")
        make(name, cache)


if __name__ == "__main__":
    main()
