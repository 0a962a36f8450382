"""The one code path every command takes: :func:`compress` (see the package docstring)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from sparsify import interrupts
from sparsify.calibration import calibration_notes
from sparsify.checkpoint import (
    ModelDir,
    check_output,
    open_model,
    partial_output,
)
from sparsify.checkpoint.output import STATE_DIR, Partial
from sparsify.devices import resolve_device
from sparsify.distributed import PeerLost, World, device_of, end_world, is_peer_error
from sparsify.errors import SparsifyError
from sparsify.pipeline.conclude import _report, _run_info
from sparsify.pipeline.measure import _eval_info, _measure, _measure_input, _Measured
from sparsify.pipeline.options import NO_DATA, WARN_PPL_RATIO, Options, QualityError, _Done, _Run
from sparsify.pipeline.prepare import _before_work, _builtin, _write_files
from sparsify.pipeline.stages import _run_model_stage, _run_stage
from sparsify.recipe import Recipe
from sparsify.report import model_card, quality_verdict, write_report
from sparsify.verify import check_written

log = logging.getLogger(__name__)


def compress(model_path: str | Path, recipe: Recipe, out: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Run ``recipe`` on the model at ``model_path`` layer by layer and write the result to ``out``.

    The input is never modified; ``out`` appears only when complete and checked (see
    :mod:`sparsify.checkpoint.output` for every rule). Returns the report; raises :class:`QualityError`
    (after writing) when the perplexity passed ``options.max_ppl_ratio`` times the input's.
    """
    opts = options or Options()
    world = opts.world
    t_start = time.perf_counter()
    md, reads, target = world.checked(lambda: _open(model_path, recipe, out, opts))
    opts = replace(opts, device=device_of(world, resolve_device(opts.device)))

    # The work folder is claimed (locked) first: a second run into OUT is refused from the start.
    with (
        partial_output(
            target, overwrite=opts.overwrite, resume=opts.resume, protect=reads, keep_interrupted=opts.keep_interrupted
        ) as work,
        contextlib.ExitStack() as held,  # the input's cached measurement, read until the output's KL is measured
    ):
        run = world.checked(lambda: _before_work(md, recipe, opts))
        info = _run_info(md, run.recipe, run.tokens, opts, work.recorded_files())
        world.same("model, recipe or calibration data", {k: v for k, v in info.items() if k not in _PER_RANK})
        # A rank's refusal here (a resumed run's mismatch) is every rank's.
        world.checked(lambda: work.begin(info, opts.overwrite))
        if world.checked(lambda: _complete(work, world)):  # killed after the output was complete: rename it
            return work.report()
        measure_input = partial(_measure_input, md, run, opts, info["model"], work.dir, held)
        before = measure_input() if not world.active else None
        done = _run_stages_with(world, md, run, opts, work)
        # Under torchrun the ranks part here: rank 0 checks and measures as one process (a loader that sees a
        # process group, as compressed-tensors' does, would wait for ranks that have finished).
        end_world(world)
        if world.leader:
            before = before or measure_input()
            report, quality = _conclude(md, run, opts, done, work.dir, before, str(model_path), target.shown, t_start)
    if not world.leader:  # a follower's copy was scratch: rank 0 wrote, checked and measured the output
        shutil.rmtree(target.path, ignore_errors=True)
        return {}
    if quality is not None and quality["status"] == "failed":
        raise QualityError(f"{quality['message']}; the output is in {target.shown}", report)
    if quality is not None and quality["status"] == "warning":
        log.warning(quality["message"])
    return report


def _open(model_path: str | Path, recipe: Recipe, out: str | Path, opts: Options) -> tuple[ModelDir, list[Path], Any]:
    """The input, the files the run reads, and where it writes: OUT, or under torchrun for ranks but 0 a
    scratch folder beside it (removed when done)."""
    resolve_device(opts.device)
    md = open_model(model_path, opts.revision)
    reads = md.read_paths() + _user_files(model_path, recipe, opts)
    if not opts.world.leader:
        out = Path(out).expanduser().absolute()
        out = out.parent / f".{out.name}.rank{opts.world.rank}"
    return md, reads, check_output(out, reads, md.path, opts.overwrite)


def _conclude(md: ModelDir, run: _Run, opts: Options, done: _Done, folder: Path, before: _Measured, model: str,
              shown: str, t_start: float) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
    """The output's files besides the weights, checked and measured; its report and model card. Returns the
    report and the quality verdict."""
    _write_files(md, run, done.config, folder)
    done.notes += check_written(folder, opts.trust_remote_code, run.tokens, set(md.source.keys()))
    after = _measure(folder, run, opts, kl_from=before.logprobs, label="the output")
    if after.perplexity is not None and "kl" in after.perplexity:  # this run's input (the cache names whichever
        given = Path(model).expanduser()  # run's path measured the same bytes first)
        after.perplexity["kl"]["reference"] = str(given.absolute() if given.exists() else md.path.absolute())
    done.notes += [n for n in (before.note, after.note) if n]
    eval_info = _eval_info(md, folder, run, opts, before, after, done.before_recovery)
    quality = quality_verdict(eval_info, opts.max_ppl_ratio, WARN_PPL_RATIO)
    report = _report(md, run, opts, done, model=model, shown=shown, out_dir=folder, eval_info=eval_info,
                     quality=quality, before=before, after=after, t_start=t_start)  # fmt: skip
    write_report(report, folder / "sparsify_report.json")
    (folder / "README.md").write_text(model_card(report, md.path / "README.md"))
    return report, quality


def _user_files(model_path: str | Path, recipe: Recipe, opts: Options) -> list[Path]:
    """Files of the user's the run reads besides the model folder (never written to or over)."""
    reads = [Path(p) for p in (recipe.calibration.data, opts.eval_data) if p and not _builtin(p) and p != NO_DATA]
    if Path(model_path).expanduser().exists():  # a .gguf input is read too, not only its converted folder
        reads.append(Path(model_path).expanduser())
    return reads


def _run_stages(md: ModelDir, run: _Run, opts: Options, work: Partial) -> _Done:
    """Each stage of the plan in turn, the next reading the one before's output; the last writes into OUT."""
    records: list[dict[str, Any]] = []
    notes = md.notes + run.notes
    cfg = copy.deepcopy(run.cfg)  # passes return edited copies; run.cfg stays the input's
    source, counts, before_recovery = md, None, None
    for k, stage in enumerate(run.plan.stages):
        interrupts.check()
        last = k == len(run.plan.stages) - 1
        out_dir = work.dir if last else work.stage(k).dir / "model"
        out_dir.mkdir(parents=True, exist_ok=True)
        if stage.model_pass is not None:  # trains what the stages before wrote, against the input model
            stage_records, stage_notes, counts, recovered = _run_model_stage(
                stage.model_pass, source, md, cfg, out_dir, work.stage(k), run, opts
            )
        else:
            cfg, stage_records, stage_notes, counts, recovered = _run_stage(
                stage, source, cfg, out_dir, work.stage(k), run, opts
            )
        if recovered and before_recovery:  # the report's is the first recovery step's: the model as compressed
            notes.append(f"perplexity before {recovered['step']}: {recovered['perplexity']:.4g}")
        before_recovery = before_recovery or recovered
        records += stage_records
        notes += stage_notes
        if not last:  # the next stage reads this one's output
            (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            source = open_model(out_dir)
    notes += [n for p in run.plan.passes for n in p.notes()] + calibration_notes(records)
    return _Done(cfg, records, notes, counts, before_recovery)


def _run_stages_with(world: World, md: ModelDir, run: _Run, opts: Options, work: Partial) -> _Done:
    """:func:`_run_stages`; under torchrun, a collective failing because another rank ended stops this one
    with one line (its finished layers kept for ``--resume`` as after a signal)."""
    try:
        return _run_stages(md, run, opts, work)
    except Exception as e:
        if world.active and is_peer_error(e):
            raise PeerLost(
                f"torchrun: another rank ended during the run (rank {world.rank} of {world.size} stops too;"
                " see that rank's error)"
            ) from e
        raise


_PER_RANK = ("device", "model_files")  # run info that differs between ranks of one torchrun job


class _KeptRefusal(SparsifyError):
    """A refusal that keeps the work folder (for a later run to finish)."""

    keep_partial = True


def _complete(work: Partial, world: World) -> bool:
    """Whether the resumed work folder holds a complete output, its run killed (SIGKILL, power loss) between
    finishing and the rename into place: only the rename is left. Refused under torchrun (the folder kept)."""
    if work.complete and world.active:
        raise _KeptRefusal(
            f"{work.dir} holds a complete output whose run was killed before renaming it into place; move it there"
            f" yourself (and delete its {STATE_DIR}), or pass --overwrite to run again"
        )
    if work.complete:
        log.info("the interrupted run's output was complete: renamed into place")
    return work.complete
