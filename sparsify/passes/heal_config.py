"""The settings of a ``type: heal`` step (:mod:`sparsify.passes.heal`), importable without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsify.passes.base import PassConfig


class HealConfig(PassConfig):
    type: Literal["heal"] = "heal"
    follow_up = "then heal each compressed layer: fit it to the dense model's hidden states (see docs/methods/heal.md)"
    steps: int = Field(128, ge=1, description="Adam steps per layer")
    samples: int | None = Field(None, ge=1, description="calibration windows fitted on [default: all of the run's]")
    windows: int = Field(2, ge=1, description="calibration windows per step")
    lr: float = Field(
        1e-2, gt=0, description="peak learning rate relative to each tensor's RMS (linear warm-up, cosine decay to 0)"
    )
    target: Literal["layer", "model"] = Field(
        "model",
        description="model: the dense model's hidden states after the layer (each layer also corrects what the"
        " layers before it got wrong); layer: the dense layer's outputs on the compressed model's inputs",
    )
    vectors: bool = Field(True, description="also train norms and biases (else only weight matrices and scales)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the fit's forward and backward: auto takes bf16 autocast on a device with bf16 units (AMX,"
        " AVX-512 BF16, GPUs) where a Linear step of the model's shape measures at least 1.3x faster in it, else fp32",
    )
