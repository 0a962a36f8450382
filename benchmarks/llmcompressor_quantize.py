"""Run vllm-project/llmcompressor's one-shot quantization on given calibration windows (its own venv).

Invoked by bench_quantize.py with the interpreter of a virtual environment holding llmcompressor; never
imported by sparsify. Prints one JSON line: {"seconds": wall time of load + oneshot + save}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _scheme(name: str, group: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits = 4 if name.startswith("w4") else 8
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        strategy="group" if group else "channel",
        group_size=group,
    )
    acts = None
    if name == "w8a8":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    elif name == "w8a8-static":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--scheme", choices=["w8a8", "w8a8-static", "w4a16", "w8a16"], required=True)
    ap.add_argument("--method", choices=["rtn", "gptq"], required=True)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--smoothquant", type=float, default=None)
    ap.add_argument("--awq", action="store_true", help="AWQModifier (duo scaling, 20-point grid) before the rounding")
    ap.add_argument("--calib", required=True, help=".pt file with a (samples, seq_len) LongTensor")
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():  # llm-compressor 0.14's AWQ pins its cached activations (a GPU transfer aid):
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # a CPU-only torch refuses; no effect on the numbers
    ids = torch.load(args.calib, weights_only=True)  # (samples, seq_len)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    groups = {"group_0": _scheme(args.scheme, args.group_size)}
    recipe = []
    if args.smoothquant is not None:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe.append(SmoothQuantModifier(smoothing_strength=args.smoothquant))
    if args.awq:
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe.append(AWQModifier(duo_scaling=True, n_grid=20))
    cls = GPTQModifier if args.method == "gptq" else QuantizationModifier
    recipe.append(cls(config_groups=groups, ignore=["lm_head"]))

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    model.save_pretrained(args.out, save_compressed=True)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
