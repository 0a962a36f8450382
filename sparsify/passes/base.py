"""What every pass is: a strict config plus optional hooks, registered by its YAML ``type``.

```
              recipe order ─────────────────────────────────────────────────▶
config pass   edit_config(cfg)                                  (at its place in the recipe)
layer pass    bind(model) → validate(targets) → prepare(runner) → compress_layer(work) per layer → edit_config(cfg)
              report: records (one dict per row), summary(records), notes()
```

A layer pass's ``edit_config`` runs after the sweep (it describes the output: a smaller
``intermediate_size``, a ``quantization_config``); a config pass's runs where the recipe puts it, so a
later layer pass calibrates the model as the config then says. The loop, the pipeline and the report
only call these hooks; they never ask what kind of pass they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from torch import nn

    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork, ModelWork
    from sparsify.statistics import InputStats
    from sparsify.targets import TargetMatcher


class StrictModel(BaseModel):
    """Pydantic model that rejects unknown keys, so a YAML typo fails with its key path.

    A key may apply only with some values of the others (``observer`` with static activations): such keys
    are named by :meth:`inapplicable`. One the user sets where it does not apply is an error (it would
    change nothing, and the user thinks it does); :meth:`dump` leaves them out, so the recipe a run writes
    reads back as exactly the same recipe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def inapplicable(self) -> dict[str, str]:
        """Keys that do not apply given the others: key -> why, completing "KEY ..." (e.g. "applies to ...")."""
        return {}

    @model_validator(mode="before")
    @classmethod
    def _choices_any_case(cls, data: Any) -> Any:
        """``W8A8`` as ``w8a8``: a choice among lowercase names is matched whatever its case."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if isinstance(value, str) and field is not None and _lowercase_choices(field.annotation):
                out[key] = value.lower()
        return out

    @model_validator(mode="after")
    def _only_applicable(self) -> StrictModel:
        for key, why in self.inapplicable().items():
            if key in self.model_fields_set:
                raise ValueError(f"{key} {why}")
        return self

    def dump(self) -> dict[str, Any]:
        """Every key that applies with its value (defaults spelled out; None, meaning "the default", left out)."""
        skip = self.inapplicable()
        out = {}
        for key, value in self.model_dump(mode="json").items():
            if key in skip or value is None:
                continue
            nested = getattr(self, key)
            if isinstance(nested, StrictModel):
                value = nested.dump()
            elif isinstance(nested, list | tuple) and nested and all(isinstance(v, StrictModel) for v in nested):
                value = [v.dump() for v in nested]
            out[key] = value
        return out


def _lowercase_choices(annotation: Any) -> bool:
    """Whether ``annotation`` is a ``Literal`` of lowercase strings (possibly ``| None``)."""
    args = (
        [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is not Literal
        else [annotation]
    )
    literals = [a for a in args if get_origin(a) is Literal]
    return bool(literals) and all(isinstance(v, str) and v == v.lower() for a in literals for v in get_args(a))


class PassConfig(StrictModel):
    """A recipe step's settings, and what the CLI and the plan know of its pass without importing it (torch):
    its command, and how it runs."""

    command: ClassVar[str | None] = None  # the CLI command that runs this pass alone (its options: the fields)
    command_help: ClassVar[str] = ""
    command_examples: ClassVar[str] = ""
    layerwise: ClassVar[bool] = True  # runs inside the layer-wise loop (False: edits the config only)
    # trains the whole model at once after the layer passes before it (a stage of its own: fit_model)
    whole_model: ClassVar[bool] = False
    # non-empty: every compressing command can append this pass as a step after its own, with ``--TYPE`` (this
    # text is its help) and ``--TYPE-KEY`` for each config field (``--heal``, ``--heal-steps``)
    follow_up: ClassVar[str] = ""

    type: str


class LayerPassConfig(PassConfig):
    targets: list[str] | None = Field(
        None, description="Linear names, class names or 're:' regexes [default: the architecture table's]"
    )
    ignore: list[str] = Field([], description="names or 're:' regexes to leave alone (applied first)")
    sequential: bool = Field(
        False, description="calibrate q/k/v, then o, then gate/up, then down, each after the ones before"
    )


def stage_of(fqn: str, stages: list[tuple[str, ...]]) -> int:
    """Index of the stage whose layer-relative names end ``fqn``; unknown names go last."""
    for index, names in enumerate(stages):
        if any(fqn.endswith("." + name) for name in names):
            return index
    return len(stages)


# What a pass may need of the model it is given, and what it may take away (the plan tracks these on the
# config alone, pass after pass, and names the pass that took away what a later one needs):
FACTS: dict[str, tuple[str, str]] = {  # fact -> (what it is, what the pass that takes it away did)
    "float": ("floating-point Linears", "quantized them"),
    "dense_ffn": ("a dense FFN (gate, up and down projections)", "turned it into experts"),
}


class Pass:
    """A recipe step. Every hook has a default that does nothing."""

    config_cls: ClassVar[type[PassConfig]]
    layerwise: ClassVar[bool] = True  # the config class's (set by register: one place)
    whole_model: ClassVar[bool] = False
    requires: frozenset[str] = frozenset({"float"})  # FACTS this pass needs of the model it is given
    removes: frozenset[str] = frozenset()  # FACTS it takes away from the passes after it
    # its zeros are decisions a later training pass must keep (unstructured pruning), even once quantized
    leaves_zeros: ClassVar[bool] = False
    # it changes which Linears a layer has, or their shapes (structured pruning, dense → MoE): a later pass of its
    # sweep that decides per Linear before the sweep (a bit budget) would decide for modules that will not exist
    reshapes: ClassVar[bool] = False
    needs: frozenset[str] = frozenset()  # statistics of target inputs (sparsify.statistics.STATS names)
    custom_stats: ClassVar[dict[str, Callable]] = {}  # name -> Stat factory, for needs the standard ones lack
    needs_dense_path: bool = False  # statistics against the dense model's inputs (first pass only)
    needs_grad: bool = False  # compress_layer runs with autograd on (training passes)
    # the outputs a training pass fits (LayerWork.teacher): "layer", the dense layer's on the compressed model's
    # inputs; "model", the dense model's hidden states after the layer (tracked beside the compressed ones)
    teacher: Literal["layer", "model"] | None = None
    needs_data: bool = True  # needs calibration text (False: e.g. magnitude pruning, RTN weight-only)
    # Under torchrun what a pass learns from data comes through its declared statistics (the loop combines them
    # over the ranks) or is combined by the pass itself (LayerWork.world, runner.world: MoE's sums, heal's
    # gradients, layer removal's scores).
    per_target: bool = False  # each target of a stage is solved alone (torchrun spreads the solves over ranks)
    # a recovery pass: what the report calls it ("healing"); the report also measures the model just before it
    recovers: str | None = None
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
        """The config (as a dict) this pass leaves behind; records for the report go to ``config_records``.

        A function of ``cfg``, of what :meth:`bind` read and of what :meth:`prepare` decided (see
        :meth:`decisions`), never of the sweep: a resumed run whose layers are all done writes the same config.
        """
        return cfg

    def plan_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The config the plan expects this pass to leave, before anything ran: :meth:`edit_config`, with a
        placeholder where it depends on a decision not yet made (which layers go: their number is known)."""
        return self.edit_config(cfg)

    def config_records(self) -> list[dict[str, Any]]:
        """Report rows produced by :meth:`edit_config` (one per layer for an attention pattern)."""
        return []

    # ------------------------------------------------------------------------------ whole model

    uses_targets: ClassVar[bool] = True  # its targets are the recipe's targets/ignore (else it picks its own)
    matcher: TargetMatcher | None = None  # the recipe's targets/ignore, compiled (set when the plan is made)

    def bind(self, model: nn.Module) -> None:
        """See the model (on the meta device) before anything runs: read sizes, refuse what cannot apply."""

    def targets_in(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        """This pass's targets in ``layer`` (whose fqn is ``prefix``) as it is now, fqn -> module."""
        return self.matcher.resolve(layer, prefix) if self.matcher is not None else {}

    def after(self, earlier: list[Pass]) -> None:
        """See the layer passes before this one in its sweep (when the plan is made); refuse (raise
        SparsifyError) an order that cannot work."""

    def validate(self, targets: dict[int, dict[str, nn.Module]]) -> None:
        """Refuse, before any work, settings these targets cannot take (raise SparsifyError)."""

    def prepare(self, runner: LayerwiseRunner) -> None:
        """Whole-model work before the compressing sweep (e.g. OWL's outlier statistics); what it decides is
        returned by :meth:`decisions`."""

    def layers_to_remove(self) -> list[int]:
        """Layers this pass removes from the model (decided in :meth:`prepare`); the loop never visits them."""
        return []

    def decisions(self) -> dict[str, Any]:
        """What :meth:`prepare` decided, as JSON data: saved with the run's state, so that ``--resume``
        restores it (:meth:`restore`) instead of deciding again."""
        return {}

    def restore(self, decisions: dict[str, Any]) -> None:
        """Take back what :meth:`decisions` returned in an earlier process."""

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

    def prepare_model(self, work: ModelWork) -> None:
        """A ``whole_model`` pass, before :meth:`fit_model` in a fresh run: what it decides (returned by
        :meth:`decisions`) is saved, and a resumed run gets it back through :meth:`restore` instead."""

    def fit_model(self, work: ModelWork) -> list[dict[str, Any]]:
        """A ``whole_model`` pass: change ``work.layers`` in place, the whole model at once; report rows."""
        raise NotImplementedError(f"{self.config.type} is not a whole-model pass")

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


def saw_no_tokens(needs: frozenset[str], stats: InputStats | None) -> bool:
    """Whether a target of a method that reads statistics (``needs``) saw no calibration token (a routed expert
    routed none, with ``expert_calibration: routed``): the pass compresses it without calibration instead."""
    return bool(needs) and (stats is None or stats.tokens == 0)


def calibration_record(stats: InputStats | None, fallback: str | None = None) -> dict[str, Any]:
    """A record's ``calibrated_on``, where a target was not calibrated on the tokens it was routed: a routed
    expert whose statistics were widened to its layer's other tokens, or one that saw none (``fallback``: how it
    was compressed instead). The report names these experts (:func:`sparsify.calibration.calibration_notes`)."""
    if fallback is not None:
        return {"calibrated_on": f"none: {fallback}"}
    if stats is not None and stats.routed is not None:
        return {"calibrated_on": f"all tokens ({stats.routed} routed)"}
    return {}


PASSES: dict[str, type[Pass]] = {}
# pass type -> (when the step's config takes it, the pass class): a family's other implementation behind the same
# ``type`` (structured pruning behind ``type: prune``), registered by its own module
VARIANTS: dict[str, list[tuple[Callable[[Any], bool], type[Pass]]]] = {}


def register(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: the YAML ``type: name`` builds this pass (its ``config_cls`` validates the step)."""

    def add(cls: type[Pass]) -> type[Pass]:
        if name in PASSES:
            raise ValueError(f"pass type {name!r} registered twice")
        cls.layerwise, cls.whole_model = cls.config_cls.layerwise, cls.config_cls.whole_model
        PASSES[name] = cls
        return cls

    return add


def register_variant(name: str, when: Callable[[Any], bool]) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: steps of ``type: name`` whose config ``when`` accepts build this pass instead (see
    :func:`variant_for`); the family's main pass need not import it."""

    def add(cls: type[Pass]) -> type[Pass]:
        VARIANTS.setdefault(name, []).append((when, cls))
        return cls

    return add


def variant_for(name: str, config: Any) -> type[Pass] | None:
    """The registered variant of pass type ``name`` that ``config`` asks for (None: the main pass)."""
    return next((cls for when, cls in VARIANTS.get(name, []) if when(config)), None)


def shorten_per_layer(cfg: dict[str, Any], keep: list[int], n: int) -> dict[str, Any]:
    """Every per-layer list of a config (length ``n``: ``layer_types``, sparsify's patterns) cut to ``keep``."""
    from sparsify.runtime.format import CONFIG_KEY

    new = {
        k: [v[i] for i in keep] if isinstance(v, list) and len(v) == n and not k.endswith("_token_id") else v
        for k, v in cfg.items()
    }
    section = cfg.get(CONFIG_KEY)
    if isinstance(section, dict) and isinstance(section.get("layers"), list) and len(section["layers"]) == n:
        new[CONFIG_KEY] = {**section, "layers": [section["layers"][i] for i in keep]}
    return new
