"""Run vllm-project/llmcompressor's one-shot pruning on given calibration windows (its own venv).

Invoked by bench_quality.py with the interpreter of a virtual environment holding llmcompressor;
never imported by sparsify. Prints one JSON line: {"seconds": wall time of load + oneshot + save}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--mask-structure", default="0:0")
    ap.add_argument("--calib", required=True, help=".pt file with a (samples, seq_len) LongTensor")
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.calib, weights_only=True)  # (samples, seq_len)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    # Decoder-layer Linears only, as sparsify does (ignore=["lm_head"] alone still pruned lm_head in 0.14).
    targets = [r"re:.*layers\.\d+\..*(q|k|v|o|gate|up|down)_proj$"]
    modifier = cls(sparsity=args.sparsity, mask_structure=args.mask_structure, targets=targets, ignore=["lm_head"])

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    oneshot(
        model=model,
        dataset=ds,
        recipe=[modifier],
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    model.save_pretrained(args.out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
