"""The time of a budget (`export gguf --target-size`) beside a plain GPTQ run of the same model, one after the other.

    python benchmarks/bench_budget_time.py [--size 105454240] [--samples 64] [--repeat 1]

Both commands as a user types them, on the float SmolLM2 folder and the same calibration (the embedded pydoc text,
`--samples` windows of 512 tokens): `sparsify quantize --scheme w4a16 --group-size 32` (GPTQ, the default method)
and `sparsify export gguf --target-size SIZE` (the importance, the Fisher, every matrix's damage at every type,
the choice, the writing). Wall-clock seconds of each process, their ratio, the CPU's flags. Run it on a quiet
machine: both use every core. Results append to bench-out/budget_time.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sparsify", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"sparsify {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="105454240", help="the budget in bytes (default: llama.cpp's Q4_K_M file)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    model = str(smollm2_path())
    root = OUT / "budget-time"
    root.mkdir(parents=True, exist_ok=True)
    calib = ["--samples", str(args.samples), "--seq-len", "512"]
    print(f"CPU: {cpu_flags()}")
    for _ in range(args.repeat):
        shutil.rmtree(root / "gptq", ignore_errors=True)
        gptq = _timed(["quantize", model, "-o", str(root / "gptq"), "--scheme", "w4a16", "--group-size", "32", *calib])
        budget = _timed(["export", "gguf", model, "-o", str(root / "budget.gguf"), "--target-size", args.size,
                         "--overwrite", *calib])  # fmt: skip
        row = {"gptq_s": round(gptq, 1), "budget_s": round(budget, 1), "ratio": round(budget / gptq, 2),
               "size": args.size, "samples": args.samples, "cpu": cpu_flags()}  # fmt: skip
        print(json.dumps(row))
        with open(OUT / "budget_time.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
