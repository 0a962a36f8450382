"""What every pass is: a strict config plus a transform applied layer by layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from sparsify.calibration import LayerwiseRunner, LinearStats


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


class LayerPass(ABC):
    """A compression pass applied to one layer at a time inside the calibration loop."""

    config_cls: ClassVar[type[LayerPassConfig]]
    config: LayerPassConfig
    needs_data: ClassVar[bool] = True
    needs_hessian: bool = False
    needs_dense_path: bool = False  # statistics against the dense model's inputs (first pass only)

    def __init__(self, config: LayerPassConfig, index: int, stages: list[tuple[str, ...]] | None = None):
        self.config = config
        self.index = index  # position in the recipe
        self._stages = stages or []  # layer-relative Linear names in data-flow order (from the arch table)

    def stages(self, targets: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
        """The groups compressed one after another inside a layer, each calibrated after the last.

        One group by default (every target sees the dense layer's inputs); with ``sequential: true``
        the table's data-flow order (q/k/v, o, gate/up, down), as GPTQ's "true sequential".
        """
        if not self.config.sequential or not self._stages:
            return [targets]
        groups: dict[int, dict[str, nn.Module]] = {}
        for fqn, module in targets.items():
            groups.setdefault(stage_of(fqn, self._stages), {})[fqn] = module
        return [groups[k] for k in sorted(groups)]

    def validate(self, targets: dict[int, dict[str, nn.Module]]) -> None:  # noqa: B027
        """Refuse, before any work, settings these targets cannot take (raise SparsifyError)."""

    def prepare(self, runner: LayerwiseRunner, targets: dict[int, dict[str, nn.Module]]) -> None:  # noqa: B027
        """Optional whole-model work before the compressing sweep (e.g. OWL's outlier statistics)."""

    @abstractmethod
    def compress(
        self, layer_index: int, targets: dict[str, nn.Module], stats: dict[str, LinearStats]
    ) -> list[dict[str, Any]]:
        """Compress ``targets`` in place; return one record per Linear for the report."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and errors."""


class ConfigPass(ABC):
    """A pass that rewrites the model's config (e.g. its attention pattern); weights pass through unchanged."""

    config_cls: ClassVar[type[PassConfig]]

    def __init__(self, config: PassConfig, index: int, stages: list[tuple[str, ...]] | None = None):
        self.config = config
        self.index = index

    @abstractmethod
    def apply(self, cfg: dict[str, Any], layers_path: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """Return the new config dict, one report record per layer, and notes."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and errors."""
