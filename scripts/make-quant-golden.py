#!/usr/bin/env python3
"""Writes tests/core/data/quant_golden.json: random GGUF quantised blocks and their
dequantised values computed by an independent implementation, the numpy dequantizers of
the `gguf` package (llama.cpp's own Python package), pinned below.

Run once, then commit the JSON:   python3 scripts/make-quant-golden.py
Without gguf/numpy at the pinned versions it makes a virtual environment for them
(default /tmp/multipole-venv-quant, or $MULTIPOLE_TOOLS_VENV) and re-runs itself there.

Each block is random bytes with its scale fields replaced by finite f16 values, so every
bit pattern of the quants (and of the packed 6-bit K-quant scales) is exercised. A few
blocks carry edge scales: zero, an f16 subnormal, a negative scale, a large one.

When the real models of scripts/fetch-models.sh are in the cache ($MULTIPOLE_MODEL_CACHE
or .cache/models), it also records, for a few of their tensors, the sum, sum of |x|, sum
of x^2 and some sampled values of the dequantised tensor (first `rows` rows), so that the
C++ dequantisation is checked on real weights too without storing them.
"""
import json
import os
import subprocess
import sys

GGUF_VERSION = "0.19.0"
NUMPY_VERSION = "2.4.6"
SEED = 20250207


def ensure_env():
    try:
        import gguf  # noqa: F401
        import numpy
        from importlib.metadata import version
        if version("gguf") == GGUF_VERSION and numpy.__version__ == NUMPY_VERSION:
            return
    except ImportError:
        pass
    if os.environ.get("MULTIPOLE_GOLDEN_REEXEC"):
        sys.exit("make-quant-golden: the tools venv does not hold the pinned gguf/numpy")
    venv = os.environ.get("MULTIPOLE_TOOLS_VENV", "/tmp/multipole-venv-quant")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    subprocess.check_call([py, "-m", "pip", "install", "--quiet",
                           f"gguf=={GGUF_VERSION}", f"numpy=={NUMPY_VERSION}"])
    env = dict(os.environ, MULTIPOLE_GOLDEN_REEXEC="1")
    os.execve(py, [py, os.path.abspath(__file__)] + sys.argv[1:], env)


ensure_env()

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

rng = np.random.default_rng(SEED)


def f16(x):
    return np.array([x], dtype="<f2").tobytes()


def rand_scale(lo=1e-3, hi=0.1, signed=True):
    s = float(rng.uniform(lo, hi))
    return -s if signed and rng.random() < 0.3 else s


# Edge scales used for the first blocks of every type (f16 subnormal: 2**-20).
EDGE = [0.0, 2.0 ** -20, -0.0625, 1000.0]

# Byte offsets of the f16 scale fields inside each block, and whether they may be negative
# (a K-quant's dmin is stored non-negative by llama.cpp's quantiser but any value is valid).
SCALE_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
BLOCKS = {T.Q4_0: 16, T.Q4_1: 16, T.Q5_0: 16, T.Q5_1: 16, T.Q8_0: 16,
          T.Q4_K: 6, T.Q5_K: 6, T.Q6_K: 6}


def make_blocks(qtype, nblocks):
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = bytearray(rng.integers(0, 256, size=nblocks * block_bytes, dtype=np.uint8).tobytes())
    for b in range(nblocks):
        for k, off in enumerate(SCALE_FIELDS[qtype]):
            if b < len(EDGE) and k == 0:
                s = EDGE[b]
            elif k == 1:
                s = rand_scale(1e-3, 0.05, signed=(b % 2 == 1))  # m / dmin
            else:
                s = rand_scale()
            at = b * block_bytes + off
            raw[at:at + 2] = f16(s)
    return bytes(raw)


# (file, size, [(tensor, rows or None for all)]) - files as scripts/fetch-models.sh names them.
REAL = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
     [("blk.0.attn_q.weight", None), ("blk.0.ffn_down.weight", None), ("token_embd.weight", 1024)]),
    ("Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf", 491400064,
     [("blk.0.attn_q.weight", None), ("blk.0.ffn_down.weight", None),
      ("blk.11.ffn_down.weight", None), ("output.weight", 512)]),
    ("Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", 1117320768,
     [("blk.0.attn_q.weight", None), ("blk.0.attn_v.weight", None)]),
]


def real_tensors(here):
    cache = os.environ.get("MULTIPOLE_MODEL_CACHE", os.path.join(here, "..", ".cache", "models"))
    out = []
    for name, size, tensors in REAL:
        path = os.path.join(cache, name)
        if not os.path.exists(path) or os.path.getsize(path) != size:
            print(f"skipping {name}: not in {cache} (run scripts/fetch-models.sh all)")
            continue
        reader = GGUFReader(path)
        by_name = {t.name: t for t in reader.tensors}
        entry = {"file": name, "size": size, "tensors": []}
        for tname, rows in tensors:
            t = by_name[tname]
            cols, nrows = int(t.shape[0]), int(t.shape[1])
            rows = nrows if rows is None else rows
            block_size, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
            row_bytes = cols // block_size * block_bytes
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)[: rows * row_bytes]
            v = dequantize(raw, t.tensor_type).astype(np.float32).reshape(-1).astype(np.float64)
            idx = sorted(rng.choice(v.size, size=16, replace=False).tolist())
            entry["tensors"].append({
                "name": tname, "type": t.tensor_type.name, "ggml_type": int(t.tensor_type),
                "cols": cols, "rows": rows,
                "sum": float(v.sum()), "sum_abs": float(np.abs(v).sum()), "sum_sq": float((v * v).sum()),
                "samples": [[i, float(f"{v[i]:.9g}")] for i in idx],
            })
        out.append(entry)
    return out


def main():
    out = {
        "generator": f"scripts/make-quant-golden.py with gguf=={GGUF_VERSION}, numpy=={NUMPY_VERSION}",
        "seed": SEED,
        "types": [],
    }
    for qtype, nblocks in BLOCKS.items():
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = make_blocks(qtype, nblocks)
        values = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype).astype(np.float32).ravel()
        assert values.size == nblocks * block_size and np.isfinite(values).all()
        out["types"].append({
            "type": qtype.name,
            "ggml_type": int(qtype),
            "block_size": block_size,
            "block_bytes": block_bytes,
            "blocks": nblocks,
            "bytes_hex": raw.hex(),
            # 9 significant digits round-trip a float32 exactly.
            "values": [float(f"{v:.9g}") for v in values.tolist()],
        })
    here = os.path.dirname(os.path.abspath(__file__))
    out["real"] = real_tensors(here)
    path = os.path.join(here, "..", "tests", "core", "data", "quant_golden.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
