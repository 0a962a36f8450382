"""GGUF exports of SmolLM2-135M in K and legacy types: block scales fitted to calibration importance vs unweighted.

    python benchmarks/bench_kquants.py q3_k q4_k q4_0 [--importance none calibration]

For each type, ``sparsify export gguf --type T`` with ``--importance none`` (llama-quantize's rule without an
imatrix) and ``--importance calibration`` (the mean square of each Linear's inputs over 64 x 512 windows of the
embedded pydoc text, as llama-imatrix measures it); both files evaluated by the same code (the GGUF read back
through transformers' loader) on held-out Wikipedia summaries, another domain than the calibration: perplexity
and KL to the float input. File sizes as ``ls -l`` counts them. Results append to bench-out/kquants.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, wiki_eval_file
from sparsify.checkpoint import gguf_to_folder
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate_with_reference
from sparsify.export import GgufConfig, export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="+")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--importance", nargs="+", default=["none", "calibration"], choices=["none", "calibration"])
    args = ap.parse_args()
    model = smollm2_path()
    wiki = wiki_eval_file()
    OUT.mkdir(exist_ok=True)
    for ktype in args.types:
        for importance in args.importance:
            out = OUT / f"smollm2-{ktype}-{importance}.gguf"
            t0 = time.perf_counter()
            config = GgufConfig(tensor_type=ktype, importance=importance, samples=args.samples)
            summary = export(model, out, "gguf", overwrite=True, **config.model_dump())
            seconds = time.perf_counter() - t0
            result = evaluate_with_reference(
                gguf_to_folder(out), model, str(wiki), 512, args.eval_windows, shown="SmolLM2 float32"
            )
            row = {
                "type": ktype,
                "importance": importance,
                "bytes": out.stat().st_size,
                "types": summary["types"],
                "perplexity": result["perplexity"],
                "kl_mean": result["kl"]["mean"],
                "top1": result["kl"]["top1"],
                "reference_perplexity": result["kl"]["reference_perplexity"],
                "export_seconds": round(seconds, 1),
                "eval": f"wiki {result['windows']} x {result['seq_len']}",
                "cpu": cpu_flags(),
            }
            print(json.dumps(row), flush=True)
            with (OUT / "kquants.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
