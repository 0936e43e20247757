#!/usr/bin/env python3
"""Nsight Compute's warp-stall samples of a kernel, summed per phase of its source.

The one-launch step marks its phases with `pc.mark(k)` (fused_step.cuh; the profiled variant times
them, bench.cpp names them). This puts each SASS instruction's samples in the phase its source line
lies in: the line in the kernel's file, or, for code inlined from another file, the kernel-file
line it was called from (the nearest one before it in the listing when the listing names neither).
Phase k holds the lines after mark k-1 up to mark k; lines after the last mark go to the last phase.
It also sums each phase's SASS bytes (gpu-notes items 43 and 58).

  nvdisasm -gi kernel.sm_90a.cubin > kernel.gi.sass    # cubin: cuobjdump -xelf all fused_step.cu.o
  ncu --kernel-name-base mangled -k regex:NAME -c 1 --section WarpStateStats --section SourceCounters -o r ...
  ncu -i r.ncu-rep --page source --csv --print-source sass > r.csv
  python3 scripts/ncu-stalls-by-phase.py kernel.gi.sass r.csv --kernel NAME [--source src/cuda/fused_step.cuh]

The listing must come from the same build as the profiled binary (the addresses are matched by
offset from the kernel's first instruction).
"""
import argparse
import collections
import csv
import json
import os
import re
import sys

PHASE_NAMES = ["prologue", "coarse-score", "barrier-1", "coarse-norm", "coarse-select", "candidates",
               "cand-score", "barrier-2", "frontier", "fine-select", "rows-issued", "far-field",
               "exact-join", "merge"]  # bench.cpp's names for pc.mark(0..13)
LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
INSTR = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
MARK = re.compile(r"\bpc\.mark\((\d+)\)")


def fail(msg):
    sys.exit(f"ncu-stalls-by-phase: {msg}")


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readlines()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")


def mark_lines(source):
    """{k: line of pc.mark(k)} in the kernel's source."""
    marks = {}
    for n, text in enumerate(read_lines(source), 1):
        for m in MARK.finditer(text):
            marks.setdefault(int(m.group(1)), n)
    if not marks:
        fail(f"{source}: no pc.mark(k) lines")
    return marks


def listing_lines(gi, kernel, source_name):
    """(name, [(offset, kernel-file line or 0)]) of the first kernel whose name holds `kernel`."""
    name, body, line = None, [], 0
    for text in read_lines(gi):
        if text.startswith(".text."):
            if name:
                break
            here = text[len(".text."):].strip().rstrip(":")
            name = here if kernel in here else None
            continue
        if not name:
            continue
        m = LINE.search(text)
        if m:
            if os.path.basename(m.group(1)) == source_name:
                line = int(m.group(2))
            elif m.group(3) and os.path.basename(m.group(3)) == source_name:
                line = int(m.group(4))
            continue
        m = INSTR.match(text)
        if m:
            body.append((int(m.group(1), 16), line))
    if not name:
        fail(f"{gi}: no kernel matches '{kernel}'")
    return name, body


def phase_of(line, marks):
    for k in sorted(marks):
        if line <= marks[k]:
            return k
    return max(marks)


def samples(path):
    """[(offset, {reason: samples})] from ncu's source page (CSV, SASS view)."""
    rows = list(csv.reader(read_lines(path)))
    header = next((i for i, r in enumerate(rows) if "Address" in r and "Source" in r), None)
    if header is None:
        fail(f"{path}: no 'Address' / 'Source' header (ncu --page source --csv --print-source sass)")
    cols = rows[header]
    at = cols.index("Address")
    reasons = [(i, c[len("stall_"):]) for i, c in enumerate(cols) if c.startswith("stall_") and "Not Issued" not in c]
    if not reasons:
        fail(f"{path}: no stall_* columns (profile with --section WarpStateStats --section SourceCounters)")
    data = [r for r in rows[header + 1:] if len(r) == len(cols) and r[at].startswith("0x")]
    if not data:
        fail(f"{path}: no instruction rows")
    base = int(data[0][at], 16)
    out = []
    for r in data:
        counts = {name: int(r[i].replace(",", "") or 0) for i, name in reasons}
        out.append((int(r[at], 16) - base, {k: v for k, v in counts.items() if v}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listing", help="nvdisasm -gi listing of the profiled build's cubin")
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass of one profiled launch")
    ap.add_argument("--kernel", required=True, help="a substring of the kernel's (mangled) name in the listing")
    ap.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "src", "cuda", "fused_step.cuh"),
                    help="the kernel's source, with its pc.mark(k) lines (default: src/cuda/fused_step.cuh)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args()

    marks = mark_lines(a.source)
    name, body = listing_lines(a.listing, a.kernel, os.path.basename(a.source))
    phase_at = {off: phase_of(line, marks) if line else 0 for off, line in body}
    code = collections.Counter(phase_at.values())
    per_phase = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    unmatched = 0
    for off, counts in samples(a.csv):
        if off not in phase_at:
            unmatched += sum(counts.values())
            continue
        per_phase[phase_at[off]].update(counts)
        total.update(counts)
    all_samples = sum(total.values())
    if all_samples == 0:
        fail(f"{a.csv}: no samples at the listing's addresses (another build?)")
    label = lambda k: PHASE_NAMES[k] if k < len(PHASE_NAMES) else f"phase-{k}"
    phases = []
    for k in sorted(set(code) | set(per_phase)):
        n = sum(per_phase[k].values())
        phases.append({"phase": label(k), "samples": n, "share": n / all_samples, "code_bytes": 16 * code[k],
                       "stalls": dict(per_phase[k].most_common())})
    if a.json:
        print(json.dumps({"kernel": name, "samples": all_samples, "unmatched_samples": unmatched,
                          "stalls": dict(total.most_common()), "phases": phases}))
        return
    print(f"{name}: {all_samples} samples ({unmatched} at addresses outside the listing), {16 * len(body)} bytes")
    print("all: " + ", ".join(f"{r} {100 * v / all_samples:.1f}%" for r, v in total.most_common(8)))
    print(f"{'phase':14s} {'samples':>8s} {'share':>6s} {'code KB':>8s}  top stalls")
    for p in phases:
        top = ", ".join(f"{r} {v}" for r, v in list(p["stalls"].items())[:4])
        print(f"{p['phase']:14s} {p['samples']:8d} {100 * p['share']:5.1f}% {p['code_bytes'] / 1024:8.1f}  {top}")


if __name__ == "__main__":
    main()
