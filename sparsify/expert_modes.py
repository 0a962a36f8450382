"""How routed MoE experts are calibrated: the recipe's ``calibration.expert_calibration`` setting as the loop reads
it (:mod:`sparsify.calibration.experts` does the work). Apart, so that the recipe loads without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ExpertMode = Literal["fill", "all", "routed"]


@dataclass(frozen=True)
class ExpertCalibration:
    mode: ExpertMode = "fill"
    min_tokens: int = 256


FILL = ExpertCalibration()  # the default
