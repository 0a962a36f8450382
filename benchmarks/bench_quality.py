"""Quality and wall time of pruning methods on SmolLM2-135M, sparsify beside llmcompressor in one run.

    python benchmarks/bench_quality.py --llmcompressor /path/to/venv/bin/python \
        ours/wanda/0.5 ours/sparsegpt/2:4 lc/wanda/0.5 lc/sparsegpt/2:4 ours/sparsegpt/0.5/dampening=0.1

A setting is TOOL/METHOD/AMOUNT[/KEY=VALUE...]: TOOL is ``ours`` or ``lc`` (llmcompressor, run in its
own virtual environment), AMOUNT a sparsity or N:M, KEY=VALUE any prune-pass field (ours only); ``--inputs dense`` calibrates
our layers on the dense model's hidden states (one forward per layer) instead of the compressed ones.
Both tools get the same calibration windows (embedded pydoc topics, seeded) and are evaluated by the
same perplexity code on held-out Wikipedia summaries. Results append to bench-out/quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, setting_value, wiki_eval_file
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate, load_tokenizer
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe


def parse_setting(spec: str) -> tuple[str, dict]:
    tool, method, amount, *extra = spec.split("/")
    step: dict = {"type": "prune", "method": method}
    if ":" in amount:
        step["pattern"] = amount
    else:
        step["sparsity"] = float(amount)
    for kv in extra:
        k, v = kv.split("=", 1)
        step[k] = setting_value(v)
    return tool, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", default=["dense"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="our compute dtype")
    ap.add_argument("--inputs", default="compressed", choices=["compressed", "dense"], help="our calibration inputs")
    ap.add_argument("--llmcompressor", help="python of a venv with llmcompressor installed")
    args = ap.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model = smollm2_path()
    eval_file = wiki_eval_file()
    OUT.mkdir(exist_ok=True)
    results = OUT / "quality.jsonl"
    calib = OUT / "calib.pt"
    tokens = sample_windows(tokenize(load_text(None), load_tokenizer(model)), args.samples, args.seq_len, 0)
    torch.save(tokens, calib)

    def ppl(path: Path) -> dict:
        return evaluate(path, str(eval_file), 512, args.eval_windows)

    for spec in args.settings:
        out = OUT / "model"
        shutil.rmtree(out, ignore_errors=True)
        if spec == "dense":
            row = {"setting": "dense", "seconds": 0.0, **ppl(model)}
        else:
            tool, step = parse_setting(spec)
            if tool == "ours":
                recipe = parse_recipe(
                    {
                        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "inputs": args.inputs},
                        "passes": [step],
                    }
                )
                t0 = time.perf_counter()
                report = compress(
                    model, recipe, out, Options(overwrite=True, evaluate=False, dtype=getattr(torch, args.dtype))
                )
                seconds = time.perf_counter() - t0
                extra = {"peak_rss_bytes": report["totals"]["peak_rss_bytes"], "compute_dtype": args.dtype,
                         "inputs": args.inputs}  # fmt: skip
            elif tool == "lc":
                if not args.llmcompressor:
                    raise SystemExit("lc settings need --llmcompressor PYTHON")
                mask = step.get("pattern", "0:0")
                cmd = [
                    args.llmcompressor, str(Path(__file__).parent / "llmcompressor_oneshot.py"), str(model), str(out),
                    "--method", step["method"], "--sparsity", str(step.get("sparsity", 0.5)),
                    "--mask-structure", mask, "--calib", str(calib),
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"llmcompressor failed:\n{proc.stderr[-3000:]}")
                seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
                for f in model.iterdir():
                    if f.name.startswith(("tokenizer", "special_tokens")):
                        shutil.copy2(f, out / f.name)
                extra = {}
            else:
                raise SystemExit(f"unknown tool in {spec}")
            row = {"setting": spec, "seconds": seconds, **extra, **ppl(out)}
        row.update(samples=args.samples, calib_seq_len=args.seq_len, date=time.strftime("%Y-%m-%d"), cpu=cpu_flags())
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
