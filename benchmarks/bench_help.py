"""How long the CLI takes to answer ``-h`` and ``--version`` (subprocesses, median of N), beside what importing torch
and transformers alone costs (what every help paid while the configs lived beside the passes' torch code).

    python benchmarks/bench_help.py [--repeats 10]

Run it on a quiet machine: the figure is a start-up time. Prints one JSON line per command, the CPU's flags in each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsify.devices import cpu_flags

COMMANDS = {
    "sparsify -h": [sys.executable, "-m", "sparsify", "-h"],
    "sparsify prune -h": [sys.executable, "-m", "sparsify", "prune", "-h"],
    "sparsify quantize -h": [sys.executable, "-m", "sparsify", "quantize", "-h"],
    "sparsify --version": [sys.executable, "-m", "sparsify", "--version"],
    "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
}


def timed(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median wall and CPU (user + system) seconds of ``repeats`` runs, after one warm-up (the page cache)."""
    import resource

    subprocess.run(cmd, capture_output=True, check=True)
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    cpu = cpu_flags()
    for name, cmd in COMMANDS.items():
        wall, cpu_s = timed(cmd, args.repeats)
        row = {"command": name, "wall_s": round(wall, 3), "cpu_s": round(cpu_s, 3), "repeats": args.repeats, "cpu": cpu}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
