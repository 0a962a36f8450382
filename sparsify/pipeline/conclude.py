"""The conclusion of a run: the output's files, its report and model card."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch

from sparsify._version import __version__
from sparsify.arch import SPARSIFY_TYPE_PREFIX
from sparsify.checkpoint import (
    ModelDir,
    open_model,
)
from sparsify.checkpoint.output import tensor_digest
from sparsify.devices import cpu_flags
from sparsify.pipeline.measure import _latency_len, _Measured
from sparsify.pipeline.options import Options, _Done, _Run
from sparsify.pipeline.prepare import _calibration_info
from sparsify.recipe import Recipe
from sparsify.report import build_report
from sparsify.sizes import source_sizes


def _report(md: ModelDir, run: _Run, opts: Options, done: _Done, *, model: str, shown: str, out_dir: Path,
            eval_info: dict[str, Any] | None, quality: dict[str, Any] | None, before: _Measured, after: _Measured,
            t_start: float) -> dict[str, Any]:  # fmt: skip
    """The run's report (sparsify_report.json; the HTML page and the model card are drawn from it)."""
    latency = None
    if before.seconds is not None and after.seconds is not None:
        latency = {"seq_len": _latency_len(run), "before_s": before.seconds, "after_s": after.seconds,
                   "cpu": cpu_flags(), "device": opts.device}  # fmt: skip
    sizes = {
        "input": source_sizes(md.source, run.cfg),
        "output": source_sizes(open_model(out_dir).source, done.config),
    }
    sparsify_type = str(done.config.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX)
    return build_report(
        run_id=opts.run_id,
        loader="sparsify.load" if sparsify_type else "transformers",
        version=__version__,
        model=model,
        output=shown,
        model_type=run.config.model_type,
        recipe=run.recipe,
        passes=run.plan.passes,
        calibration=_calibration_info(run),
        records=done.records,
        totals={
            "parameters": done.counts.parameters,
            "quantized_parameters": done.counts.quantized,
            "input_bytes": sum(Path(f).stat().st_size for f in md.source.files),
            "nonzeros": done.counts.nonzeros,
            "bytes": done.counts.bytes,
            "wall_seconds": time.perf_counter() - t_start,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        eval_info=eval_info,
        quality=quality,
        notes=done.notes,
        sizes=sizes,
        latency=latency,
    )


def _run_info(
    md: ModelDir, recipe: Recipe, tokens: torch.Tensor | None, opts: Options, known: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a --resume must match: the model (every byte of its config and weights), the effective recipe, the
    calibration tokens and the device; and the weight files' stamps (``known``: a resumed run's, whose files
    unchanged since are not hashed again), which are not compared."""
    files = md.weight_files(known, opts.progress)
    return {
        "sparsify_version": __version__,
        "model": md.fingerprint(files),
        "recipe": recipe.to_yaml(),
        "calibration_tokens": tensor_digest(tokens) if tokens is not None else None,
        "device": opts.device,
        **({"world_size": opts.world.size} if opts.world.active else {}),
        "model_files": files,
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
