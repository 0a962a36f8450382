"""One process against two under torchrun (gloo) on SmolLM2-135M: the same output, and the wall time of each.

    python benchmarks/bench_distributed.py [SETTING ...] [--samples 64] [--seq-len 512] [--nproc 2]

Each SETTING (:data:`SETTINGS`) runs as the user runs it: ``python -m sparsify ...`` and
``torchrun --standalone --nproc-per-node N -m sparsify ...``, same model, same calibration, ``--no-eval``
(the wall time is the compression's). Both outputs are then evaluated by one process with the same code
(``sparsify.evaluate``, held-out pydoc windows of the embedded text: what every run reports). Reported: the
wall times and their ratio, both perplexities and their relative difference, whether the tensors are
byte-identical, how far they moved (max |delta|) and the share of pruning masks or quantized integers that agree. torchrun gives each rank
``OMP_NUM_THREADS=1``; one process uses every core torch takes by default. Results append to
bench-out/distributed.jsonl, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file

from benchmarks.common import OUT
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate

SETTINGS: dict[str, list[str]] = {
    "sparsegpt-50": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-50": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    "gptq-w4a16-g64": ["quantize", "--scheme", "w4a16", "--method", "gptq", "--group-size", "64"],
    "moe-8-coactivation": ["moe-convert", "--experts", "8", "--top-k", "4", "--split", "coactivation"],
}


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _aligned(one: Path, many: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a, b = _tensors(one), _tensors(many)
    if a.keys() != b.keys():
        raise SystemExit(f"{one} and {many} hold other tensors")
    return [a[k] for k in sorted(a)], [b[k] for k in sorted(a)]


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |delta| over float tensors; the share of zeros (masks) or integers (quantized weights) that agree."""
    delta, same, total = 0.0, 0, 0
    for k, t in a.items():
        u = b[k]
        if t.is_floating_point():
            delta = max(delta, float((t.float() - u.float()).abs().max()))
            if k.endswith("proj.weight"):
                same, total = same + int(torch.eq(t == 0, u == 0).sum()), total + t.numel()
        else:
            same, total = same + int(torch.eq(t, u).sum()), total + t.numel()
    return {"max_abs_delta": delta, "agree": same / total if total else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", default=["sparsegpt-50", "gptq-w4a16-g64", "moe-8-coactivation"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    model = smollm2_path()
    OUT.mkdir(exist_ok=True)
    common = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--no-eval", "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    for name in args.settings:
        command, *flags = SETTINGS[name]
        one, many = OUT / f"dist-{name}-1", OUT / f"dist-{name}-{args.nproc}"
        t_one = _run([sys.executable, "-m", "sparsify", command, str(model), "-o", str(one), *flags, *common])
        t_many = _run([*torchrun, "-m", "sparsify", command, str(model), "-o", str(many), *flags, *common])
        ppl = {n: evaluate(p, None, [512], 16, torch.float32)["perplexity"] for n, p in (("1", one), ("n", many))}
        row = {
            "setting": name,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "nproc": args.nproc,
            "seconds_1": round(t_one, 1),
            f"seconds_{args.nproc}": round(t_many, 1),
            "time_ratio": round(t_many / t_one, 3),
            "ppl_1": ppl["1"],
            f"ppl_{args.nproc}": ppl["n"],
            "ppl_rel_diff": ppl["n"] / ppl["1"] - 1,
            "identical": all(torch.equal(t, u) for t, u in zip(*_aligned(one, many), strict=True)),
            **_agreement(_tensors(one), _tensors(many)),
            "cpu": cpu_flags(),
        }
        print(json.dumps(row), flush=True)
        with (OUT / "distributed.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
