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
    targets: list[str] | None = None  # None: the architecture table's defaults
    ignore: list[str] = []


class LayerPass(ABC):
    """A compression pass applied to one layer at a time inside the calibration loop."""

    config_cls: ClassVar[type[PassConfig]]
    needs_data: ClassVar[bool] = True
    needs_hessian: bool = False

    def __init__(self, config: PassConfig, index: int):
        self.config = config
        self.index = index  # position in the recipe

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
