"""Orchestration: model folder + recipe → compressed folder + report. One code path for every command.

```
compress(model, recipe, out)
  check OUT, claim its work folder (locked)
  plan: the whole recipe walked on the config alone (sparsify.plan): refused here, or every step applies
  input: every tensor checked against the config, and finite
  calibration windows; held-out windows for the perplexity before and after
  stage by stage: config passes, prepare (whole-model decisions, saved), the layer-wise sweep, config edits;
    or a whole-model pass (distillation) on the model the stages before wrote
  the output: shards, config, tokenizer, recipe.yaml; checked (config vs tensors, transformers' loader,
  finite logits); perplexity after; report and model card; renamed into place
```
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import resource
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify import interrupts
from sparsify._version import __version__
from sparsify.arch import SPARSIFY_TYPE_PREFIX, is_encoder, lookup
from sparsify.calibration import (
    ERROR_WINDOWS,
    InMemoryLayers,
    LayerwiseRunner,
    ModelWork,
    Probe,
    ResumePoint,
    RunOutput,
    calibration_notes,
    resumed_probe,
    tracks_dense_path,
)
from sparsify.checkpoint import (
    DEFAULT_SHARD_BYTES,
    LazyLayers,
    ModelDir,
    assemble,
    check_layer_count,
    check_output,
    copy_aux_files,
    open_model,
    partial_output,
)
from sparsify.checkpoint.output import STATE_DIR, Partial, StageState, tensor_digest
from sparsify.checkpoint.stage_model import Layers, StageModel, load_outside_layers, open_stage_model, rest_keys
from sparsify.data import (
    BUILTIN_CALIB,
    BUILTIN_EVAL,
    check_token_ids,
    eval_windows,
    load_text,
    sample_windows,
    tokenize,
)
from sparsify.devices import available_memory, cpu_flags, resolve_device
from sparsify.distributed import SINGLE, PeerLost, World, device_of, end_world, is_peer_error
from sparsify.errors import SparsifyError
from sparsify.evaluate import (
    BATCH_TOKENS,
    DEFAULT_EVAL_WINDOWS,
    SavedLogprobs,
    before_after,
    embedding_similarity,
    eval_lengths,
    eval_window_count,
    evaluate,
    forward_seconds,
    load_tokenizer,
    perplexity,
    perplexity_of_hidden,
    protocol_label,
)
from sparsify.passes import Pass
from sparsify.passes.base import shorten_per_layer
from sparsify.plan import Plan, Stage, checked_config, config_from_dict, make_plan
from sparsify.progress import NOTICE, NoProgress, Progress
from sparsify.recipe import Recipe
from sparsify.references import evict, open_reference, reference_key
from sparsify.report import build_report, model_card, quality_verdict, write_report
from sparsify.sizes import fmt_bytes, source_sizes
from sparsify.verify import check_finite, check_written

log = logging.getLogger(__name__)

WARN_PPL_RATIO = 3.0  # perplexity after / before above which a run warns loudly (--max-ppl-ratio: an error)
NO_DATA = "none"  # calibration.data: run without calibration text (passes that need none)


@dataclass
class Options:
    """Run settings that are not part of the recipe (they do not change the output's weights)."""

    overwrite: bool = False
    dtype: torch.dtype | None = None  # compute dtype; None: the recipe's (written into OUT/recipe.yaml either way)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto: where calibration and evaluation run
    trust_remote_code: bool = False
    evaluate: bool = True  # perplexity before and after (False: --no-eval)
    eval_data: str | None = None  # that perplexity's text; None: windows of the calibration text held out from it
    eval_seq_lens: tuple[int, ...] | None = None  # None: 512, or what the recipe's passes ask for
    eval_max_windows: int | None = None  # None: DEFAULT_EVAL_WINDOWS, or every window of eval_data when given
    max_ppl_ratio: float | None = None  # perplexity after / before above which the run fails (output kept)
    latency: bool = False  # measure a forward's wall time before and after (the report's headline)
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    resume: bool = False  # continue an unfinished run into the same output (same model, recipe, settings)
    keep_interrupted: bool = True  # a run stopped by a signal keeps its finished layers for --resume
    revision: str | None = None  # branch, tag or commit when the model is a Hugging Face Hub repo id
    progress: Progress = field(default_factory=NoProgress)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # in the report: which run wrote an output
    world: World = SINGLE  # this process's place in a torchrun job (see sparsify.distributed)


class QualityError(SparsifyError):
    """The output was written, but its perplexity is past ``--max-ppl-ratio`` times the input's."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------- layers


def _remove_layers(model: nn.Module, layers: Layers, removed: list[int]) -> None:
    """Drop layers from the model (skeleton or in memory) before the sweep: its config, its layer list and
    each module's own ``layer_idx`` follow, so the forward and the loop see the smaller model."""
    n = len(layers.modules)
    keep = [i for i in range(n) if i not in set(removed)]
    kept = nn.ModuleList([layers.modules[i] for i in keep])
    parent, _, attr = layers.path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    config = model.config
    for key, value in shorten_per_layer(config.to_dict(), keep, n).items():
        if isinstance(value, list | dict) and getattr(config, key, None) != value:
            setattr(config, key, value)
    config.num_hidden_layers = len(keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layers.modules = kept
    layers.source_index = [layers.source_index[i] for i in keep]


def _prepare(model: nn.Module, layers: Layers, passes: list[Pass], runner: LayerwiseRunner,
             saved: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """Each pass's whole-model decisions in recipe order (``saved``: an earlier run's, restored instead);
    layers a pass removes are gone for the passes after it. Returns the decisions, to save."""
    decisions = {}
    for p in passes:
        if saved is not None:
            p.restore(saved.get(str(p.index), {}))
        else:
            p.prepare(runner)
        decisions[str(p.index)] = p.decisions()
        removed = p.layers_to_remove()
        if removed:
            _remove_layers(model, layers, removed)
            runner.layers = layers.modules
    return decisions


def _resolver(layers: Layers):
    def resolve(p: Pass, i: int, layer: nn.Module) -> dict[str, nn.Module]:
        return p.targets_in(layer, f"{layers.path}.{i}")

    return resolve


def _finish_records(output: RunOutput) -> None:
    for record in output.records:
        record["rel_error"] = output.errors.get(record["name"])


def compress_model(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[RunOutput, list[str]]:
    """Compress an in-memory model in place with the same plan and loop as :func:`compress` (for tests, notebooks).

    Modules are reshaped and layers removed in the model itself; its config's sizes are left to the
    caller (``compress`` writes them from each pass's ``edit_config``).
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "transformers_version"}
    plan = make_plan(recipe, cfg, lambda c: model.config if c == cfg else config_from_dict(c, cfg, lambda: None))
    if len(plan.stages) > 1 or plan.stages[0].config_passes:
        raise SparsifyError("compress_model runs layer passes only; attention passes rewrite a saved config")
    passes = plan.stages[0].layer_passes
    layers = Layers.of(model)
    device = next(model.parameters()).device
    runner = LayerwiseRunner(
        model.base_model, layers.modules, InMemoryLayers(layers.modules), tokens, recipe.calibration.batch_size,
        progress, device, layers.path, recipe.calibration.inputs, experts=recipe.calibration.experts,
    )  # fmt: skip
    runner.whole = lambda: model
    _prepare(model, layers, passes, runner, None)
    runner.provider = InMemoryLayers(layers.modules)
    output = runner.run(passes, _resolver(layers))
    _finish_records(output)
    return output, plan.notes + [n for p in passes for n in p.notes()]


# ------------------------------------------------------------------------------------------- compress


@dataclass
class _Run:
    """Everything decided before any work: the recipe as it runs, the plan, the calibration and evaluation data."""

    recipe: Recipe
    plan: Plan
    config: Any  # the input's PretrainedConfig
    cfg: dict[str, Any]  # the input's config.json
    tokens: torch.Tensor | None
    calib_name: str | None
    calib_why: str  # why fewer windows ran than the recipe asks for ("" when they all ran)
    eval_lengths: list[int]
    eval_stream: torch.Tensor | None  # the perplexity's tokens (None: not measured)
    eval_name: str | None  # what they are
    notes: list[str]


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


@dataclass
class _Done:
    """What the stages left: the output's config, the per-module records, notes, and the output's counts."""

    config: dict[str, Any]
    records: list[dict[str, Any]]
    notes: list[str]
    counts: Any
    # where a recovery pass ran: {"step": its name ("healing"), "perplexity": the model's just before it}
    before_recovery: dict[str, Any] | None = None


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


@dataclass
class _Measured:
    """Perplexity (decoders; the output's with its KL from the input's next-token distribution) and a forward's wall
    time (``--latency``) of one folder; None: not measured. ``note``: why the KL was not measured."""

    perplexity: dict[str, Any] | None
    seconds: float | None
    note: str | None = None
    logprobs: SavedLogprobs | None = None  # the input's: the output's KL reference (None: not saved)


def _reference_logprobs(work_dir: Path) -> SavedLogprobs:
    """Where the input's log-probabilities wait for the output's KL: in the work folder's state, which goes before
    the rename into place (and stays for ``--resume``)."""
    return SavedLogprobs(work_dir / STATE_DIR / "reference-logprobs")


def _measure(
    path: Path,
    run: _Run,
    opts: Options,
    save: SavedLogprobs | None = None,
    kl_from: SavedLogprobs | None = None,
    label: str = "the input",
) -> _Measured:
    """``path`` (``label``: the input or the output) measured; the input's log-probabilities streamed to ``save`` as
    its perplexity is (on the first length's windows), or the KL from those in ``kl_from`` measured with the
    output's."""
    ppl, note = None, None
    if run.eval_stream is not None:
        windows = eval_windows(run.eval_stream, run.eval_lengths[0], _eval_window_count(opts))  # (W, L)
        if save is not None:
            problem = save.space_problem(windows, int(getattr(run.config, "vocab_size", 0) or 0))
        else:
            problem = kl_from.problem(windows) if kl_from is not None else None
        if problem is not None:
            if save is not None:  # an interrupted run's, were it left, is not taken for this one's
                save.meta_path.unlink(missing_ok=True)
            note, save, kl_from = f"KL to the input not measured: {problem}", None, None
        ppl = _perplexity(path, run, opts, save, kl_from, label)
    return _Measured(ppl, _seconds(path, run, opts), note, save)


def _seconds(path: Path, run: _Run, opts: Options) -> float | None:
    if not opts.latency:
        return None
    return forward_seconds(path, _latency_len(run), torch.float32, opts.trust_remote_code, opts.device)


def _measure_input(
    md: ModelDir, run: _Run, opts: Options, fingerprint: str, work_dir: Path, held: contextlib.ExitStack
) -> _Measured:
    """The input measured (:func:`_measure`), or its measurement on this protocol taken from the cache
    (:mod:`sparsify.references`): measured once per model and protocol, by whichever run came first. The entry
    stays ``held`` (not evicted) until the output's KL has read it; while another run measures the same entry,
    this one measures into its work folder (kept there for ``--resume``)."""
    if run.eval_stream is None or is_encoder(run.config.model_type):
        return _measure(md.path, run, opts)
    own = partial(_measure, md.path, run, opts, save=_reference_logprobs(work_dir))  # into the work folder
    if opts.trust_remote_code:  # the model's own code is not in the key
        return own()
    count = _eval_window_count(opts)
    key = reference_key(fingerprint, run.eval_stream, run.eval_lengths, count, str(_dtype(run.recipe)), opts.device)
    windows = eval_windows(run.eval_stream, run.eval_lengths[0], count)  # (W, L)
    try:
        ref = open_reference(key, usable=lambda r: r.logprobs.problem(windows) is None)
    except OSError as e:  # the cache's folder cannot be written: measured as without one
        log.info("the cache of measurements is not usable (%s): the input measured into the work folder", e)
        ref = None
    if ref is None:
        return own()
    held.callback(ref.release)
    vocab = int(getattr(run.config, "vocab_size", 0) or 0)
    if ref.perplexity() is None and ref.logprobs.space_problem(windows, vocab) is not None:
        ref.release()  # no room on the cache's disk: the work folder's may have it
        return own()
    if (info := ref.perplexity()) is not None:
        when = info.get("measured_at", "earlier")
        log.info("the input's perplexity on %s: %.3f, measured %s (cached)", protocol_label(info),
                 info["perplexity"], when)  # fmt: skip
        note = f"the input's perplexity and log-probabilities on these windows taken from the cache (measured {when})"
        return _Measured(info, _seconds(md.path, run, opts), note, ref.logprobs)
    measured = _measure(md.path, run, opts, save=ref.logprobs)
    if measured.perplexity is not None:
        ref.store(measured.perplexity)
        evict(keep=ref.dir.name)
        log.log(
            NOTICE,
            "the input's perplexity and log-probabilities on these windows (%s) are kept in %s for"
            " later runs of this model (sparsify cache --clear frees them)",
            fmt_bytes(ref.bytes),
            ref.dir.parent,
        )
    return measured


def _eval_info(
    md: ModelDir,
    out_dir: Path,
    run: _Run,
    opts: Options,
    before: _Measured,
    after: _Measured,
    before_recovery: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Perplexity before and after (decoders; and before a recovery pass, at the first length, where measured),
    or the embeddings' similarity to the input's (encoders)."""
    if opts.evaluate and is_encoder(run.config.model_type):
        return embedding_similarity(out_dir, md.path, opts.eval_data, dtype=_dtype(run.recipe), device=opts.device)
    if before.perplexity is None or after.perplexity is None:
        return None
    info = before_after(before.perplexity, after.perplexity)
    if before_recovery is not None:
        info["before_recovery"] = before_recovery
    return info


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


def _before_work(md: ModelDir, recipe: Recipe, opts: Options) -> _Run:
    """Everything that can refuse the run, before any work: the config, the whole plan (on the config alone),
    the input's tensors (against the config, and finite), the calibration and evaluation data."""
    config = md.load_config(opts.trust_remote_code)
    if (arch := lookup(config.model_type)) is not None:  # before building a model of the size it claims
        check_layer_count(md.source, arch.layers, int(config.num_hidden_layers))
    md.code_files()  # refuses an auto_map whose code is missing
    cfg = json.loads(md.config_path.read_text())
    if opts.dtype is not None:
        recipe = recipe.model_copy(update={"dtype": str(opts.dtype).removeprefix("torch.")})
    plan = make_plan(recipe, cfg, _config_of(md, cfg, opts), opts.trust_remote_code, _dtype(recipe))
    # the defaults the plan resolved on this model (w4a16's group size) written into OUT/recipe.yaml as numbers
    recipe = recipe.model_copy(update={"passes": [p.config for p in plan.passes]})
    layered = bool(plan.layer_passes)
    _check_world(plan, recipe, opts.world)
    notes: list[str] = list(plan.notes)
    if layered:
        recipe, fitted = _fit_context(recipe, config)
        notes += fitted
        _check_memory(plan, recipe, config, opts)
    lengths, eval_notes = eval_lengths(
        opts.eval_seq_lens, [p.eval_lengths or () for p in plan.passes], config, opts.evaluate
    )
    encoder = is_encoder(config.model_type)
    tokens, calib_name, stream, why = None, None, None, ""
    if layered and recipe.calibration.data == NO_DATA:
        _check_data_free(plan)
    elif layered:
        tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
        tokens, calib_name, stream, calib_notes = _calibration_tokens(
            recipe, tokenizer, lengths if _held_out(opts, encoder) else None
        )
        notes += calib_notes
        if not any(p.needs_data for p in plan.weight_passes) and tokens.shape[0] > ERROR_WINDOWS:
            tokens = tokens[:ERROR_WINDOWS]  # statistics unused: run only the windows errors are measured on
            why = (
                f"only {ERROR_WINDOWS} of the {recipe.calibration.samples} windows ran: no pass here learns from"
                " calibration data, the layers' output errors are measured on these"
            )
    rows = getattr(config, "vocab_size", None)  # the embedding's rows (checked against its tensor next)
    check_token_ids(tokens, rows, calib_name)
    open_stage_model(md, config, opts.trust_remote_code, None)  # every tensor against the config's model
    check_finite(md.source, opts.progress)
    eval_name = f"{calib_name} (held-out windows, not calibrated on)" if stream is not None else None
    if opts.evaluate and not encoder:
        notes += eval_notes
        if stream is None:  # --eval FILE, or no calibration text of the user's: the embedded one's held-out part
            tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
            text = load_text(opts.eval_data, default=BUILTIN_EVAL, tokenizer=tokenizer)
            stream, eval_name = tokenize(text, tokenizer), text.name
        check_token_ids(stream, rows, eval_name)
    return _Run(recipe, plan, config, cfg, tokens, calib_name, why, lengths, stream, eval_name, notes)


def _check_world(plan: Plan, recipe: Recipe, world: World) -> None:
    """Under torchrun: each rank has calibration windows."""
    if not world.active:
        return
    cal = recipe.calibration
    batches = 1 + math.ceil(max(0, cal.samples - ERROR_WINDOWS) / cal.batch_size)  # as calibration_batches makes
    if plan.layer_passes and batches < world.size:
        raise SparsifyError(
            f"torchrun: {world.size} ranks for {batches} calibration batch(es) ({cal.samples} windows, batch size"
            f" {cal.batch_size}); every rank needs one at least (more --samples or a smaller --batch-size)"
        )


def _check_memory(plan: Plan, recipe: Recipe, config: Any, opts: Options) -> None:
    """Refuse, before any window is sampled, calibration whose hidden states cannot fit where they are kept: every
    window's, a layer's inputs and outputs at once (twice that where the dense model's path is tracked too), in the
    compute dtype on the run's device, beside the token windows (int64) on the CPU."""
    cal = recipe.calibration
    hidden = getattr(config, "hidden_size", None)
    if cal.data == NO_DATA or not isinstance(hidden, int):
        return
    used = cal.samples if any(p.needs_data for p in plan.weight_passes) else min(cal.samples, ERROR_WINDOWS)
    used = -(-used // opts.world.size)  # a rank's share
    tracked = tracks_dense_path(cal.inputs, plan.passes)
    per_window = cal.seq_len * hidden * _dtype(recipe).itemsize * (4 if tracked else 2)  # bytes of hidden states
    per_token_window = cal.seq_len * 8 + 64  # an int64 window, and its start while sampling
    on_device = opts.device != "cpu"
    needs = [(used * per_window, opts.device, per_window)] if on_device else []
    cpu_bytes = cal.samples * per_token_window + (0 if on_device else used * per_window)
    needs.append((cpu_bytes, "cpu", per_token_window + (0 if on_device else per_window)))
    for need, device, each in needs:
        have = available_memory(device)
        if have is not None and need > have:
            where = "this machine has" if device == "cpu" else f"{device} has"
            raise SparsifyError(
                f"calibration with --samples {cal.samples} (× {cal.seq_len} tokens, hidden size {hidden},"
                f" {recipe.dtype}) needs ~{need / 2**30:,.1f} GiB for its windows and activations; {where}"
                f" {have / 2**30:,.1f} GiB available: at most {max(0, have // each):,} samples fit"
            )


def _held_out(opts: Options, encoder: bool) -> bool:
    """Whether the perplexity is measured on windows held out of the calibration text."""
    return opts.evaluate and opts.eval_data is None and not encoder


def _builtin(path: str) -> bool:
    return str(path).startswith("builtin:")


def _dtype(recipe: Recipe) -> torch.dtype:
    return getattr(torch, recipe.dtype)


def _config_of(md: ModelDir, original: dict[str, Any], opts: Options):
    def config_of(cfg: dict[str, Any]):
        return config_from_dict(cfg, original, lambda: md.load_config(opts.trust_remote_code))

    return config_of


def _write_files(md: ModelDir, run: _Run, cfg: dict[str, Any], folder: Path) -> None:
    """Tokenizer, generation and licence files, remote code, the config (if changed) and the effective recipe."""
    copy_aux_files(md.path, folder)
    for f in md.code_files():  # remote code travels with the checkpoint that needs it
        shutil.copy2(f, folder / f.name)
    if cfg != run.cfg:
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "recipe.yaml").write_text(run.recipe.to_yaml())


def _check_data_free(plan: Plan) -> None:
    """With ``calibration.data: none`` every layer pass must work without data (magnitude, RTN weight-only)."""
    for p in plan.weight_passes:
        if p.needs_data:
            raise SparsifyError(
                f"pass {p.index} ({p.describe()}) needs calibration data; calibration.data is 'none'"
                " (data-free: magnitude pruning, RTN weight-only quantization)"
            )


# ----------------------------------------------------------------------------------- one stage


def _run_stage(
    stage: Stage,
    md: ModelDir,
    cfg: dict[str, Any],
    out_dir: Path,
    state: StageState,
    run: _Run,
    opts: Options,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str], Any, dict[str, Any] | None]:
    """One stage: config passes, the sweep of its layer passes, their config edits; the stage's output
    (weights and config) written to ``out_dir``. Returns the config it leaves, its records, notes and counts,
    and where a recovery pass runs, its name and the perplexity of the model before it (None: not measured)."""
    records: list[dict[str, Any]] = []
    before_recovery = None
    for p in stage.config_passes:
        cfg = checked_config(p, p.edit_config(cfg))
        records += p.config_records()
    dtype = _dtype(run.recipe)
    skel = _stage_skeleton(md, cfg, opts, dtype)
    notes = list(skel.notes)
    layers = None
    if stage.layer_passes:
        layers = Layers.of(skel.model)
        load_outside_layers(skel, layers, md, dtype, opts.device)
        device = torch.device(opts.device)
        provider = LazyLayers(layers.modules, layers.path, md.source, skel.keymap, state.layers, dtype, device)
        runner = LayerwiseRunner(
            skel.model.base_model, layers.modules, provider, run.tokens, run.recipe.calibration.batch_size,
            opts.progress, device, layers.path, run.recipe.calibration.inputs, opts.world,
            run.recipe.calibration.experts,
        )  # fmt: skip
        runner.whole = _with_head(skel, layers, md, dtype, opts.device)
        saved = state.decisions()
        # under torchrun every rank must take the same path from here (prepare or restore, sweep or not)
        opts.world.same(
            "state of the unfinished run (decisions saved, stage complete)", [saved is not None, state.complete]
        )
        decisions = _prepare(skel.model, layers, stage.layer_passes, runner, saved)
        if saved is None:
            state.save_decisions(decisions)
        provider.layers, provider.source_index = layers.modules, layers.source_index
        step = next((p.recovers for p in stage.layer_passes if p.recovers), None)  # a recovery pass: its name
        probe = _probe(run, opts) if step else None
        windows = tensor_digest(torch.cat(probe)) if probe is not None else None  # what the probe measures on
        if state.complete:
            output = _saved_output(state, len(layers.modules))
            before_recovery = state.recovered(windows) if windows is not None else None
        else:
            output = _sweep(runner, stage, layers, state, opts.world, probe)
        if output.probe is not None:
            load_outside_layers(skel, layers, md, dtype, opts.device, head=True)
            ppl = perplexity_of_hidden(skel.model, layers.modules, output.probe)
            before_recovery = {"step": step, "perplexity": ppl}
            if windows is not None:  # a run resumed from here on reports it too
                state.save_recovered(before_recovery, windows)
        if (start := state.resumed_at) is not None:
            notes.append(
                f"resumed at layer {start} of {len(layers.modules)}: earlier layers kept from the interrupted run"
            )
        if probe is not None and before_recovery is None:
            notes.append(f"perplexity before {step} not measured: the run was resumed")
        _finish_records(output)
        records += output.records
        for p in stage.layer_passes:
            cfg = checked_config(p, p.edit_config(cfg))
    counts = _assemble_stage(out_dir, state, md, skel, layers, opts)
    return cfg, records, notes, counts, before_recovery


def _with_head(skel: StageModel, layers: Layers, md: ModelDir, dtype: torch.dtype, device: str):
    def whole() -> nn.Module:
        load_outside_layers(skel, layers, md, dtype, device, head=True)
        return skel.model

    return whole


def _stage_skeleton(md: ModelDir, cfg: dict[str, Any], opts: Options, dtype: torch.dtype) -> StageModel:
    """The model a stage works on (config ``cfg``, tensors from ``md``), on the meta device, checked."""
    config = config_from_dict(
        cfg, json.loads(md.config_path.read_text()), lambda: md.load_config(opts.trust_remote_code)
    )
    return open_stage_model(md, config, opts.trust_remote_code, dtype)


def _assemble_stage(
    out_dir: Path, state: StageState, md: ModelDir, skel: StageModel, layers: Layers | None, opts: Options
) -> Any:
    """The stage's output shards in ``out_dir`` from its saved layers and the input's other tensors; the
    stage marked complete. Returns the counts."""
    counts = assemble(
        out_dir, state.layers, md.source, rest_keys(md, skel.keymap, layers), state.dir, opts.max_shard_bytes
    )
    state.mark_complete()
    return counts


def _run_model_stage(
    p: Pass,
    md: ModelDir,
    dense: ModelDir,
    cfg: dict[str, Any],
    out_dir: Path,
    state: StageState,
    run: _Run,
    opts: Options,
) -> tuple[list[dict[str, Any]], list[str], Any, dict[str, Any] | None]:
    """A whole-model pass (distillation): the model the stages before wrote (``md``), read whole; the dense
    input model's (``dense``) hidden states after its last layer on the calibration windows, one layer in memory
    at a time; the pass trains; the layers saved and the output assembled as a sweep's. An interrupted stage
    starts again from ``md`` (same bytes), unless every trained layer was saved: then only the assembly is redone.
    Returns records, notes, counts and the perplexity of the model before it (None: not measured)."""
    dtype, device = _dtype(run.recipe), torch.device(opts.device)
    skel = _stage_skeleton(md, cfg, opts, dtype)
    layers = Layers.of(skel.model)
    n = len(layers.modules)
    recovered = None
    saved = state.decisions()
    trained = state.resumed and state.progress() == n  # every trained layer saved: nothing to train again
    # under torchrun every rank must take the same path from here (decide or restore, train or not)
    opts.world.same(
        "state of the unfinished run (decisions saved, stage trained, stage complete)",
        [saved is not None, trained, state.complete],
    )
    if state.complete or trained:
        records = _saved_output(state, n).records
        recovered = (state.layers.info(0) or {}).get("recovered")
    else:
        tokens, teacher = _dense_final_states(dense, run, opts)
        load_outside_layers(skel, layers, md, dtype, opts.device, head=True)
        provider = LazyLayers(layers.modules, layers.path, md.source, skel.keymap, state.layers, dtype, device)
        for i in range(n):
            provider.load(i)
        if (probe := _probe(run, opts)) is not None:
            windows = torch.cat(probe)  # (W, L)
            ppl = perplexity(skel.model, windows.to(device), batch_size=int(probe[0].shape[0]))
            recovered = {"step": p.recovers, "perplexity": ppl}
        work = ModelWork(skel.model, layers.modules, tokens, teacher, device, opts.progress, opts.world)
        if saved is None:
            p.prepare_model(work)
            state.save_decisions(p.decisions())
        else:
            p.restore(saved)
        records = p.fit_model(work)
        first = {"records": records, "errors": {}, "recovered": recovered}  # what a resumed run reports
        for i, layer in enumerate(layers.modules):
            provider.finish(i, layer, write=True, info=first if i == 0 else {"records": [], "errors": {}})
        state.checkpoint(n, [], None)
    return records, list(skel.notes), _assemble_stage(out_dir, state, md, skel, layers, opts), recovered


def _dense_final_states(dense: ModelDir, run: _Run, opts: Options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(windows, hidden)`` per calibration batch (this rank's share under torchrun): the token windows
    ``(B, L)`` and the input model's hidden states after its last layer on them ``(B, L, d)``, computed one
    layer at a time."""
    dtype, device = _dtype(run.recipe), torch.device(opts.device)
    skel = open_stage_model(dense, dense.load_config(opts.trust_remote_code), opts.trust_remote_code, dtype)
    layers = Layers.of(skel.model)
    load_outside_layers(skel, layers, dense, dtype, opts.device)
    provider = LazyLayers(layers.modules, layers.path, dense.source, skel.keymap, None, dtype, device)
    runner = LayerwiseRunner(
        skel.model.base_model, layers.modules, provider, run.tokens, run.recipe.calibration.batch_size,
        opts.progress, device, layers.path, world=opts.world,
    )  # fmt: skip
    last = len(layers.modules) - 1
    states = runner.observe(lambda work, outs: outs if work.index == last else None, "the dense model's outputs")
    return [t.to(device) for t in runner.batches()], states[-1]


def _saved_output(state: StageState, n_layers: int) -> RunOutput:
    output = RunOutput()
    for i in range(n_layers):
        info = state.layers.info(i) or {}
        output.records += info.get("records", [])
        output.errors.update(info.get("errors", {}))
    return output


def _sweep(
    runner: LayerwiseRunner,
    stage: Stage,
    layers: Layers,
    state: StageState,
    world: World,
    probe: list[torch.Tensor] | None = None,
) -> RunOutput:
    """The layer-wise loop, continuing from a checkpoint of an earlier run when resuming (under torchrun every
    rank from its own, all at the same layer: each checkpoint is taken by all of them or none); ``probe``: see
    :meth:`LayerwiseRunner.run` (a resumed sweep takes what the probe's windows became from its checkpoint)."""
    start: ResumePoint | None = state.resume_point()
    world.same("resume point (the layer its unfinished run reached)", start[0] if start is not None else None)
    prior = RunOutput()
    n = len(layers.modules)
    if start is not None:
        prior = _saved_output(state, start[0])
        if start[0] >= n:  # every layer done: what the probe's windows became, if saved
            prior.probe = resumed_probe(probe, start[3], runner.device)
            return prior
    timer = {"last": 0.0, "cost": 0.0}

    def checkpoint(
        next_layer: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None, probe: Probe | None
    ) -> None:
        # Save the activations entering the next layer unless that costs much and more than ~10% of the run.
        now = time.perf_counter()
        if next_layer == n:  # every layer done: nothing to carry over but the probe's (a perplexity to measure)
            state.checkpoint(next_layer, [], None, probe)
        elif world.gather_objects(timer["cost"] < 0.05 or now - timer["last"] >= 10 * timer["cost"])[0]:
            state.checkpoint(next_layer, hidden, dense, probe)
            timer["last"], timer["cost"] = time.perf_counter(), time.perf_counter() - now

    output = runner.run(stage.layer_passes, _resolver(layers), start, checkpoint, probe)
    output.records[:0] = prior.records
    output.errors.update(prior.errors)
    return output


# ------------------------------------------------------------------------------------------- helpers


def _calibration_tokens(
    recipe: Recipe, tokenizer, eval_lengths: list[int] | None
) -> tuple[torch.Tensor, str, torch.Tensor | None, list[str]]:
    """``(windows, text name, held-out stream or None, notes)``: the calibration windows, and (``eval_lengths``
    given) tokens held out of the calibration text for the perplexity before and after.

    The embedded default text has a held-out part of its own (the same the ``eval`` command reads); a user's
    text gives its last ``DEFAULT_EVAL_WINDOWS`` windows (fewer if it is short) and is calibrated on the rest.
    """
    cal = recipe.calibration
    text = load_text(cal.data, text_column=cal.text_column, tokenizer=tokenizer)
    notes = [text.note] if text.note else []
    stream = tokenize(text, tokenizer)
    held = None
    if eval_lengths is not None and text.name != BUILTIN_CALIB:
        length = max(eval_lengths)
        windows = min(DEFAULT_EVAL_WINDOWS, (stream.numel() - cal.seq_len) // length)
        if windows >= 1:
            held, stream = stream[-windows * length :], stream[: -windows * length]
        else:
            notes.append(
                f"perplexity not measured: {text.name} is too short to hold out a {length}-token window besides"
                f" calibration (pass --eval FILE, or more text)"
            )
    return sample_windows(stream, cal.samples, cal.seq_len, cal.seed), text.name, held, notes


def _calibration_info(run: _Run) -> dict[str, Any] | None:
    if run.tokens is None:
        return None
    return {
        "text": run.calib_name,
        "windows": int(run.tokens.shape[0]),
        "seq_len": int(run.tokens.shape[1]),
        # output errors are measured on the first ERROR_WINDOWS calibration windows only
        "error_tokens": int(min(ERROR_WINDOWS, run.tokens.shape[0]) * run.tokens.shape[1]),
        **({"why": run.calib_why} if run.calib_why else {}),
    }


def _latency_len(run: _Run) -> int:
    return min(512, *run.eval_lengths)


def _eval_window_count(opts: Options) -> int | None:
    return eval_window_count(opts.eval_data, opts.eval_max_windows)


def _probe(run: _Run, opts: Options) -> list[torch.Tensor] | None:
    """The perplexity's windows (first context length), in batches, for a stage with a recovery pass (heal): the
    report measures the model as it was before it on them too (rank 0 only: it alone measures)."""
    if run.eval_stream is None or not opts.world.leader:
        return None
    length = run.eval_lengths[0]
    windows = eval_windows(run.eval_stream, length, _eval_window_count(opts))  # (W, L)
    return list(windows.split(max(1, BATCH_TOKENS // length)))


def _perplexity(
    path: Path,
    run: _Run,
    opts: Options,
    save: SavedLogprobs | None = None,
    kl_from: SavedLogprobs | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    return evaluate(
        path,
        None,
        run.eval_lengths,
        _eval_window_count(opts),
        _dtype(run.recipe),
        opts.trust_remote_code,
        opts.progress,
        opts.device,
        stream=run.eval_stream,
        text_name=run.eval_name,
        save_logprobs=save,
        kl_from=kl_from,
        label=label,
    )


def _fit_context(recipe: Recipe, config) -> tuple[Recipe, list[str]]:
    """Calibration windows within the model's context: a default is shortened (noted), an explicit value refused."""
    limit = getattr(config, "max_position_embeddings", None)
    cal = recipe.calibration
    if not limit or cal.seq_len <= limit:
        return recipe, []
    if "seq_len" in cal.model_fields_set:
        raise SparsifyError(
            f"calibration seq_len {cal.seq_len} is beyond the model's context (max_position_embeddings {limit});"
            f" use --seq-len {limit} or less"
        )
    fitted = recipe.model_copy(update={"calibration": cal.model_copy(update={"seq_len": int(limit)})})
    return fitted, [
        f"calibration windows shortened from the default {cal.seq_len} to the model's context, {limit} tokens"
    ]


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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["WARN_PPL_RATIO", "Options", "QualityError", "compress", "compress_model"]
