"""The settings of a ``type: quantize`` step (:mod:`sparsify.passes.quantize`), importable without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from sparsify.passes.base import LayerPassConfig, StrictModel
from sparsify.passes.quantize_methods import QUANTIZE_METHODS, SCHEMES
from sparsify.sizes import parse_size

if TYPE_CHECKING:
    from sparsify.runtime.quantized import Activations, QuantScheme

DEFAULT_GROUP = 128  # w4a16's group size where it divides every target's inputs (llm-compressor's, vLLM's usual)
GGUF_BLOCK = 32  # weights per GGUF Q4_0 / Q4_1 / Q8_0 block: w4a16's default elsewhere (the export keeps it as stored)


class QATConfig(StrictModel):
    steps: int = Field(200, ge=1, description="Adam steps per layer (linear warm-up over 5%, then a cosine to 0)")
    lr: float = Field(1e-4, gt=0, description="learning rate of the weights (scales: lr / 10)")
    windows: int = Field(1, ge=1, description="calibration windows per step")


class AWQConfig(StrictModel):
    grid: int = Field(20, ge=2, le=1000, description="exponents tried in [0, 1) (and plain rounding)")
    duo_scaling: bool = Field(
        True, description="scales from the inputs' and the weights' magnitudes (llm-compressor's default), else inputs'"
    )


class QuantizeConfig(LayerPassConfig):
    type: Literal["quantize"] = "quantize"
    command = "quantize"
    command_help = (
        "Quantize a model into the compressed-tensors format (transformers and vLLM load it): W8A8 with dynamic or"
        " static activations (optionally SmoothQuant), weight-only int4/int8 with RTN or GPTQ, QAT."
    )
    command_examples = (
        "Examples: sparsify quantize ./model -o ./model-w8a8 --scheme w8a8 --smoothquant 0.5;"
        " sparsify quantize ./model -o ./model-w4 --scheme w4a16 --method gptq --group-size 32"
    )
    scheme: Literal[tuple(SCHEMES)] = Field(
        description="w8a8 (int8 activations per token), w8a8-static (one calibrated scale), w4a16, w8a16 (weight-only)"
    )
    method: Literal[tuple(QUANTIZE_METHODS)] = Field("gptq", description="weight rounding: round-to-nearest or GPTQ")
    group_size: int | None = Field(
        None,
        description=f"weights per scale along the input; -1: per channel [default: w4a16: {DEFAULT_GROUP} where it"
        f" divides every quantized Linear's inputs, else {GGUF_BLOCK}, GGUF's block (exports to GGUF as stored);"
        " w8a16: per channel]",
    )
    symmetric: bool = Field(
        True,
        description="weights symmetric around zero, or with a zero point (weight-only schemes)",
        json_schema_extra={"flag": "--symmetric/--asymmetric"},
    )
    weight_scale: Literal["signed-max", "abs-max"] = Field(
        "signed-max",
        description="symmetric weight-only grids: signed-max puts each group's extreme on the end level -8 "
        "(llama.cpp Q4_0's rule, all 16 levels used; scales may be negative); abs-max is max|w|/7.5",
    )
    act_order: bool | None = Field(
        None, description="GPTQ: columns in decreasing Hessian-diagonal order (default on, as llm-compressor's)"
    )
    dampening: float = Field(0.01, gt=0.0, description="GPTQ: fraction of mean diag(H) added to H")
    blocksize: int = Field(128, gt=0, description="GPTQ: columns solved per block")
    observer: Literal["minmax", "percentile", "mse"] = Field(
        "mse", description="static activation range (mse: the clipping that minimises the squared error)"
    )
    weight_observer: Literal["minmax", "mse", "weighted-mse"] = Field(
        "minmax",
        description="weight range (RTN, GPTQ's groups): mse, the clipping of least squared error; weighted-mse,"
        " each weight's error weighted by its input's mean square (calibrated)",
    )
    smoothquant: float | None = Field(None, ge=0.0, le=1.0, description="SmoothQuant migration strength alpha")
    qat: QATConfig | None = Field(None, description="then tune each layer with fake quantization (QAT)")
    awq: AWQConfig | None = Field(
        None,
        description="weight-only: AWQ's activation-aware per-channel scales, searched per norm/Linear pair on the"
        " calibration inputs and folded into the model before rounding",
    )
    target_bpw: float | None = Field(
        None,
        gt=0,
        le=32,
        description="w4a16: int4 or int8 (per channel) for each Linear, chosen by measured sensitivity (a Fisher"
        " diagonal on the calibration) for this many bits per weight over the quantized Linears, scales counted",
    )
    target_size: str | None = Field(
        None,
        description="as --target-bpw, for the checkpoint's bytes: every tensor (embeddings, norms, LM head) as"
        " written, e.g. 95MB or 2GiB",
        json_schema_extra={"metavar": "SIZE"},
    )

    def inapplicable(self) -> dict[str, str]:
        out = {}
        for other in QUANTIZE_METHODS.values():
            if other.name != self.method:
                why = f"is a {other.title} option (method: {other.name})"
                out.update({k: why for k in other.options if k not in QUANTIZE_METHODS[self.method].options})
        if self.activations != "static":
            out["observer"] = "sets static activation scales: it needs scheme w8a8-static"
        if self.activations is not None:
            out["group_size"] = f"is for w4a16/w8a16: {self.scheme} quantizes weights per channel (int8 kernels)"
            out["symmetric"] = (
                f"does not apply: {self.scheme} weights are symmetric (the int8 kernels take no zero point)"
            )
            out["weight_scale"] = f"is for w4a16/w8a16: {self.scheme} keeps positive abs-max weight scales"
            out["awq"] = (
                f"protects salient weights of weight-only schemes (w4a16, w8a16); {self.scheme} takes smoothquant"
            )
        elif not self.symmetric:
            out["weight_scale"] = "chooses a symmetric grid's scale: asymmetric weights take (max - min) / 15"
        if self.activations is None:
            out["smoothquant"] = "moves activation outliers into the weights: it needs w8a8 or w8a8-static"
        return out

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        acts = self.activations is not None
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive width or -1 (per channel), got {self.group_size}")
        if acts and self.group_size not in (None, -1):
            raise ValueError(
                f"{self.scheme} quantizes weights per channel (int8 kernels); group_size is for w4a16/w8a16"
            )
        if self.qat is not None and self.sequential:
            raise ValueError("qat tunes each whole layer at once; it does not combine with sequential stages")
        if self.target_bpw is not None and self.target_size is not None:
            raise ValueError("target_bpw and target_size are two budgets; give one")
        if self.budgeted:
            what = "target_bpw" if self.target_bpw is not None else "target_size"
            if self.scheme != "w4a16":
                raise ValueError(
                    f"{what} chooses int4 or int8 for each Linear of a weight-only model: it needs scheme w4a16"
                    f" (the smaller of the two), not {self.scheme}"
                )
            if self.qat is not None:
                raise ValueError(f"{what} does not combine with qat (one grid per layer while it tunes)")
        if self.awq is not None and self.sequential:
            raise ValueError("awq folds scales from a Linear into the next (v -> o, up -> down), which sequential"
                             " stages quantize apart; give one")  # fmt: skip
        if self.target_size is not None:
            parse_size(self.target_size)  # ValueError naming what is expected
        return self

    @property
    def budgeted(self) -> bool:
        """Whether a bit budget chooses each Linear's scheme (see :mod:`sparsify.passes.quantize_budget`)."""
        return self.target_bpw is not None or self.target_size is not None

    @property
    def gptq_act_order(self) -> bool:
        return self.method == "gptq" and self.act_order is not False

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme].bits

    @property
    def activations(self) -> Activations:
        return SCHEMES[self.scheme].activations

    @property
    def group_auto(self) -> bool:
        """Whether the group size is the default's to choose from the model's widths (w4a16 without group_size):
        :meth:`QuantizePass.validate` resolves it before any work, into the config the run records."""
        return self.group_size is None and self.activations is None and self.bits == 4

    @property
    def weight_group(self) -> int | None:
        """Inputs per weight scale (None: per channel); :data:`DEFAULT_GROUP` while :attr:`group_auto`."""
        if self.group_size == -1 or self.activations is not None:
            return None
        return self.group_size if self.group_size is not None else (DEFAULT_GROUP if self.bits == 4 else None)

    def gguf_type(self) -> str | None:
        """The GGUF block type that holds these weights as stored in groups of :data:`GGUF_BLOCK` (None: none)."""
        if self.activations is not None:
            return None
        if self.bits == 4:
            return "Q4_0" if self.symmetric else "Q4_1"
        return "Q8_0" if self.symmetric else None

    def quant_scheme(self) -> QuantScheme:
        from sparsify.algorithms.quant import PerChannel, PerGroup, QuantArgs
        from sparsify.runtime.quantized import QuantScheme

        g = self.weight_group
        signed = self.activations is None and self.symmetric and self.weight_scale == "signed-max"
        weights = QuantArgs(self.bits, self.symmetric, PerGroup(g) if g else PerChannel(), signed_scale=signed)
        return QuantScheme(weights, self.activations)
