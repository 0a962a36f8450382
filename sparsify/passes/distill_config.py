"""The settings of a ``type: distill`` step (:mod:`sparsify.passes.distill`), importable without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsify.passes.base import PassConfig


class DistillConfig(PassConfig):
    type: Literal["distill"] = "distill"
    layerwise = False
    whole_model = True
    follow_up = (
        "then train the whole model to match the dense model's next-token distribution (end-to-end distillation,"
        " after --heal if given; see docs/methods/heal.md)"
    )
    tokens: int = Field(65536, ge=1, description="token budget: calibration tokens the training steps read")
    windows: int = Field(2, ge=1, description="calibration windows per step")
    lr: float = Field(
        1e-3, gt=0, description="peak learning rate relative to each tensor's RMS (linear warm-up, cosine decay to 0)"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    vectors: bool = Field(True, description="also train norms and biases (else only weight matrices and scales)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the training steps: auto takes bf16 autocast on a device with bf16 units (AMX, AVX-512 BF16,"
        " GPUs) where a Linear step of the model's shape measures at least 1.3x faster in it, else fp32",
    )
