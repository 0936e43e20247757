#!/usr/bin/env python3
"""Decode and prefill speed of `multipole generate` (dense and multipole attention) side by
side with llama.cpp (llama-cpp-python, built from PyPI's source distribution for this CPU)
on the same GGUF file, the same prompt tokens and the same thread counts, in one run.

    python3 scripts/bench-vs-llama-cpp.py [--model GGUF] [--cli build/bin/multipole]
        [--threads 1,2] [--json]

Cases: short (a 32-token prompt, 128 tokens generated), 2K (2048-token prompt, 32 generated)
and 8K (7936-token prompt, 128 generated: decode near the 8K context limit of SmolLM2).
Prompts are the project's own docs, tokenized by llama.cpp and given to both as token ids.
Both run greedy with EOS ignored and an F16 KV cache. llama.cpp is timed around its eval
calls (prefill: the prompt's eval and the first argmax; decode: one eval + argmax per token,
whose Python share, an argmax over 49K logits, is ~1% of a step); multipole by its --json
summary (prefill includes the first sample; decode includes sampling).
llama.cpp runs with flash attention off and on; the table shows both.

Without llama-cpp-python at the pinned version the script makes a virtual environment
($MULTIPOLE_BENCH_VENV, default /tmp/multipole-venv-bench), builds it there with
GGML_NATIVE=ON (llama.cpp at its best on this CPU) and re-runs itself.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
NUMPY_VERSION = "1.26.4"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("short", 32, 128), ("2K", 2048, 32), ("8K", 7936, 128)]


def ensure_env():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_cpp_env
    llama_cpp_env.ensure(LLAMA_CPP_PYTHON_VERSION, [f"numpy=={NUMPY_VERSION}"],
                         os.environ.get("MULTIPOLE_BENCH_VENV", "/tmp/multipole-venv-bench"),
                         "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                         "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")


def prompt_text():
    parts = []
    for pattern in ("README.md", "docs/*.md", "../shared/docs/*.md"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    if not parts:
        sys.exit(f"no prompt text found under {ROOT}")
    return "\n\n".join(parts)


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return -1.0


def run_llama_cpp(model, ids, generate, threads, flash_attn):
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=model, n_ctx=8192, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=flash_attn, verbose=False, seed=0)
    n_vocab = llm.n_vocab()

    def argmax_last():  # the logits of the last evaluated token, straight from llama.cpp
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    next_id = argmax_last()  # the first token comes from the prompt's logits, as in multipole
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(generate - 1):
        llm.eval([next_id])
        next_id = argmax_last()
    decode_s = time.perf_counter() - t0
    result = {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": (generate - 1) / decode_s,
              "prompt_tokens": len(ids), "decode_steps": generate - 1}
    del llm
    return result


def run_multipole(cli, model, ids, generate, threads, attention):
    cmd = [cli, "generate", "--model", model, "--prompt-ids", ",".join(map(str, ids)), "-n", str(generate),
           "-t", "0", "--ignore-eos", "--threads", str(threads), "--kv-dtype", "f16", "--attention", attention,
           "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    return {"prefill_tok_s": j["prefill_tokens_per_second"], "decode_tok_s": j["decode_tokens_per_second"],
            "prompt_tokens": j["prompt_tokens"], "decode_steps": j["generated_tokens"] - 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(os.environ.get("MULTIPOLE_MODEL_CACHE",
                                                                   os.path.join(ROOT, ".cache", "models")),
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "bin", "multipole"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = ap.parse_args()
    for path, what in ((args.model, "--model"), (args.cli, "--cli")):
        if not os.path.exists(path):
            sys.exit(f"{what}: {path} does not exist")
    ensure_env()
    import llama_cpp

    probe = llama_cpp.Llama(model_path=args.model, n_ctx=16, verbose=False, vocab_only=True)
    all_ids = probe.tokenize(prompt_text().encode("utf-8"), add_bos=False, special=False)
    del probe
    chosen = [c for c in CASES if c[0] in args.cases.split(",")]
    need = max(c[1] for c in chosen)
    if len(all_ids) < need:
        all_ids = (all_ids * (need // len(all_ids) + 1))
    print(f"model {os.path.basename(args.model)}; llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load_average():.2f}", file=sys.stderr)
    if not args.json:
        print(f"{'threads':>7} {'case':>6} {'prompt':>6} {'engine':<24} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'decode vs llama.cpp':>19}")
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, prompt_len, generate in chosen:
            ids = all_ids[:prompt_len]
            rows = [("llama.cpp", lambda: run_llama_cpp(args.model, ids, generate, threads, False)),
                    ("llama.cpp flash-attn", lambda: run_llama_cpp(args.model, ids, generate, threads, True)),
                    ("multipole dense", lambda: run_multipole(args.cli, args.model, ids, generate, threads, "dense")),
                    ("multipole multipole",
                     lambda: run_multipole(args.cli, args.model, ids, generate, threads, "multipole"))]
            results = []
            for engine, fn in rows:
                r = fn()
                r.update({"engine": engine, "threads": threads, "case": name, "load_average": load_average()})
                results.append(r)
            best_llama = max(r["decode_tok_s"] for r in results if r["engine"].startswith("llama.cpp"))
            for r in results:
                r["decode_vs_best_llama_cpp"] = r["decode_tok_s"] / best_llama if best_llama else 0.0
                if args.json:
                    print(json.dumps(r))
                else:
                    print(f"{threads:>7} {name:>6} {r['prompt_tokens']:>6} {r['engine']:<24} {r['prefill_tok_s']:>13.1f} "
                          f"{r['decode_tok_s']:>12.1f} {r['decode_vs_best_llama_cpp']:>18.2f}x")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
