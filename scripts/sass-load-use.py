#!/usr/bin/env python3
"""Global loads whose result is used soon after them, in an nvdisasm SASS listing.

A warp that reads a load's register a few instructions after the LDG stalls there for the whole
round trip, and the loads behind it in program order are not issued yet (gpu-notes item 46).
This lists, per kernel, every LDG whose destination is read within --within instructions.

  nvdisasm -c kernel.sm_90a.cubin > kernel.sass      # cubin: cuobjdump -xelf all file.cu.o
  python3 scripts/sass-load-use.py kernel.sass [--kernel SUBSTRING] [--within 25]

nvdisasm and cuobjdump come with the CUDA toolkit (or the nvidia-cuda-nvdisasm and
nvidia-cuda-cuobjdump wheels); they are not needed to build or test the project.
"""
import argparse
import re
import sys

INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LOAD = re.compile(r"(@!?U?P[T\d]\s+)?LDG(\.[A-Z0-9_]+)*\s+(R\d+)")


def registers(op, first):
    """The registers an LDG of this form writes: 1, 2 (.64) or 4 (.128) from `first`."""
    n = 4 if ".128" in op else 2 if ".64" in op else 1
    return {f"R{int(first[1:]) + k}" for k in range(n)}


def kernels(lines):
    name, body = None, []
    for line in lines:
        if line.startswith(".text."):
            if name:
                yield name, body
            name, body = line[len(".text."):].rstrip(":"), []
        elif name:
            m = INSTR.match(line)
            if m:
                body.append((int(m.group(1), 16), m.group(2)))
    if name:
        yield name, body


def report(name, body, within):
    hits = []
    for i, (addr, text) in enumerate(body):
        m = LOAD.match(text)
        if not m:
            continue
        regs = registers(text.split()[1] if m.group(1) else text.split()[0], m.group(3))
        for j in range(i + 1, min(i + 1 + within, len(body))):
            parts = body[j][1].split(None, 1)
            if len(parts) < 2:
                continue
            operands = parts[1].split(",")
            dest, sources = operands[0].split()[-1], ",".join(operands[1:])
            if "[" in operands[0]:  # a store's or an atomic's address: read, not written
                dest, sources = "", parts[1]
            if any(re.search(rf"\b{r}\b", sources) for r in regs):
                hits.append((addr, text, j - i, body[j][0], body[j][1]))
                break
            if dest in regs:  # overwritten before any use
                break
    if hits:
        print(f"{name}: {len(hits)} loads used within {within} instructions")
        for addr, text, dist, uaddr, use in hits:
            print(f"  {addr:05x} {text[:56]:56s} -> {dist:2d} at {uaddr:05x} {use[:56]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass", help="nvdisasm -c output")
    ap.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--within", type=int, default=25, help="instructions between the load and its use (25)")
    a = ap.parse_args()
    try:
        with open(a.sass) as f:
            lines = f.read().split("\n")
    except OSError as e:
        sys.exit(f"sass-load-use: cannot read {a.sass}: {e.strerror}")
    found = False
    for name, body in kernels(lines):
        if a.kernel in name:
            found = True
            report(name, body, a.within)
    if not found:
        sys.exit(f"sass-load-use: no kernel in {a.sass} matches '{a.kernel}'")


if __name__ == "__main__":
    main()
