"""What every pass is: a strict config plus optional hooks, registered by its YAML ``type``.

```
              recipe order ─────────────────────────────────────────────────▶
config pass   edit_config(cfg)                                  (at its place in the recipe)
layer pass    validate(plan) → prepare(runner) → compress_layer(work) per layer → edit_config(cfg)
              report: records (one dict per row), summary(records), notes()
```

A layer pass's ``edit_config`` runs after the sweep (it describes the output: a smaller
``intermediate_size``, a ``quantization_config``); a config pass's runs where the recipe puts it, so a
later layer pass calibrates the model as the config then says. The loop, the pipeline and the report
only call these hooks; they never ask what kind of pass they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork
    from sparsify.targets import TargetMatcher


class StrictModel(BaseModel):
    """Pydantic model that rejects unknown keys, so a YAML typo fails with its key path."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PassConfig(StrictModel):
    type: str


class LayerPassConfig(PassConfig):
    targets: list[str] | None = None  # None: the architecture table's defaults
    ignore: list[str] = []
    sequential: bool = False  # true-sequential: calibrate each stage of a layer after the stages before it


def stage_of(fqn: str, stages: list[tuple[str, ...]]) -> int:
    """Index of the stage whose layer-relative names end ``fqn``; unknown names go last."""
    for index, names in enumerate(stages):
        if any(fqn.endswith("." + name) for name in names):
            return index
    return len(stages)


class Pass:
    """A recipe step. Every hook has a default that does nothing."""

    config_cls: ClassVar[type[PassConfig]]
    layerwise: ClassVar[bool] = True  # runs inside the layer-wise loop (False: edits the config only)
    needs: frozenset[str] = frozenset()  # statistics of target inputs (sparsify.statistics.STATS names)
    custom_stats: ClassVar[dict[str, Callable]] = {}  # name -> Stat factory, for needs the standard ones lack
    needs_dense_path: bool = False  # statistics against the dense model's inputs (first pass only)
    needs_grad: bool = False  # compress_layer runs with autograd on (training passes)
    terminal: ClassVar[bool] = False  # leaves modules no later layer pass can take (it must be the last one)
    needs_data: bool = True  # needs calibration text (False: e.g. magnitude pruning, RTN weight-only)
    eval_lengths: tuple[int, ...] | None = None  # context lengths worth measuring perplexity at

    def __init__(self, config: PassConfig, index: int, arch: Arch | None = None):
        self.config = config
        self.index = index  # position in the recipe
        self.arch = arch

    @classmethod
    def build(cls, config: PassConfig, index: int, arch: Arch | None = None) -> Pass:
        """The pass for ``config`` (a registered type may pick one of several implementations)."""
        return cls(config, index, arch)

    # ---------------------------------------------------------------------------------- config

    def edit_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The config (as a dict) this pass leaves behind; records for the report go to ``config_records``."""
        return cfg

    def config_records(self) -> list[dict[str, Any]]:
        """Report rows produced by :meth:`edit_config` (one per layer for an attention pattern)."""
        return []

    # ------------------------------------------------------------------------------ whole model

    uses_targets: ClassVar[bool] = True  # its targets are the recipe's targets/ignore (else it picks its own)
    matcher: TargetMatcher | None = None  # the recipe's targets/ignore, compiled (set when the plan is made)

    def bind(self, model: nn.Module) -> None:
        """See the model (on the meta device) before anything runs: read sizes, refuse what cannot apply."""

    def default_targets(self) -> tuple[str, ...]:
        """Layer-relative names targeted when the recipe gives none (the table's Linears)."""
        return self.arch.targets if self.arch is not None else ()

    def targets_in(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        """This pass's targets in ``layer`` (whose fqn is ``prefix``) as it is now, fqn -> module."""
        return self.matcher.resolve(layer, prefix) if self.matcher is not None else {}

    def validate(self, targets: dict[int, dict[str, nn.Module]]) -> None:
        """Refuse, before any work, settings these targets cannot take (raise SparsifyError)."""

    def prepare(self, runner: LayerwiseRunner, targets: dict[int, dict[str, nn.Module]]) -> None:
        """Whole-model work before the compressing sweep (e.g. OWL's outlier statistics)."""

    def layers_to_remove(self) -> list[int]:
        """Layers this pass removes from the model (decided in :meth:`prepare`); the loop never visits them."""
        return []

    # -------------------------------------------------------------------------------- per layer

    def stages(self, targets: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
        """The groups compressed one after another inside a layer, each calibrated after the last.

        One group by default (every target sees the dense layer's inputs); with ``sequential: true``
        the table's data-flow order (q/k/v, o, gate/up, down), as GPTQ's "true sequential".
        """
        stages = self.arch.stages if self.arch is not None else []
        if not getattr(self.config, "sequential", False) or not stages:
            return [targets]
        groups: dict[int, dict[str, nn.Module]] = {}
        for fqn, module in targets.items():
            groups.setdefault(stage_of(fqn, stages), {})[fqn] = module
        return [groups[k] for k in sorted(groups)]

    def stat_targets(self, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Whose inputs the statistics are gathered on (default: the targets themselves)."""
        return targets

    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        """Compress ``work.targets`` in place (modules may be reshaped or replaced); report rows."""
        return []

    # ---------------------------------------------------------------------------------- report

    kind: ClassVar[str] = "pass"  # groups report rows: one table and one summary per kind
    title: ClassVar[str] = "pass"  # the heading of the kind's table
    columns: ClassVar[tuple[tuple[str, str, str], ...]] = ()  # (record key, header, format) of the kind's table

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        """Summary rows for every record of this kind, from all passes of it: ``(label, text, json key, value)``."""
        return []

    def notes(self) -> list[str]:
        """Lines for the report's notes (what was decided, what was not applied)."""
        return []

    def describe(self) -> str:
        """One line for logs, errors and the report."""
        return self.config.type


PASSES: dict[str, type[Pass]] = {}


def register(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: the YAML ``type: name`` builds this pass (its ``config_cls`` validates the step)."""

    def add(cls: type[Pass]) -> type[Pass]:
        if name in PASSES:
            raise ValueError(f"pass type {name!r} registered twice")
        PASSES[name] = cls
        return cls

    return add
