"""A run's settings that are not the recipe's (:class:`Options`), what is decided before any work (:class:`Run`)
and what the stages hand to the conclusion (:class:`Done`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsify.checkpoint import DEFAULT_SHARD_BYTES
from sparsify.distributed import SINGLE, World
from sparsify.errors import SparsifyError
from sparsify.plan import Plan
from sparsify.progress import NoProgress, Progress
from sparsify.recipe import Recipe

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


@dataclass
class _Done:
    """What the stages left: the output's config, the per-module records, notes, and the output's counts."""

    config: dict[str, Any]
    records: list[dict[str, Any]]
    notes: list[str]
    counts: Any
    # where a recovery pass ran: {"step": its name ("healing"), "perplexity": the model's just before it}
    before_recovery: dict[str, Any] | None = None
