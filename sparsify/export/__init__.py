"""Output formats other runtimes load: one entry of :data:`FORMATS` per format.

An entry names its options (a strict pydantic config: the CLI makes one flag per field, as for the passes),
the file suffix it writes and, as ``module:function``, the writer, imported only when it runs. ``sparsify
export <name> MODEL -o FILE`` is generated from each entry; adding a format is adding an entry.

The writer's contract: ``write(model_path, out, config, overwrite, progress) -> summary``, where ``out`` is
written aside and renamed when complete, nothing is written before every refusal has had its say, and the
summary is a JSON-ready dict (``path``, ``bytes``, ``notes``, ...).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from sparsify.errors import SparsifyError
from sparsify.passes.base import StrictModel
from sparsify.progress import NoProgress, Progress
from sparsify.sizes import parse_size

# ``export gguf --type``: floats, then llama.cpp's types with most bits first; its non-linear 4-bit types last
GgufType = Literal["auto", "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k",
                   "q2_k", "iq4_nl", "iq4_xs", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m",
                   "q3_k_s"]  # fmt: skip


class GgufConfig(StrictModel):
    tensor_type: GgufType = Field(
        "auto",
        description="tensor type of the weight matrices: auto keeps quantized layouts as stored (others rounded to"
        " the nearest GGUF block type) and floats in 16 bits (bf16 stays bf16, else f16); q*, iq4_* (re)quantize"
        " (*_k: llama.cpp's K-quants, iq4_*: its non-linear 4-bit types; *_k and iq4_xs rows not whole blocks of 256"
        " in llama-quantize's fallback type); q*_k_s/m/l: llama-quantize's named mixes, each matrix in the type"
        " it gives (more bits for attn_v, ffn_down, the output head), fitted by sparsify",
        json_schema_extra={"flag": "--type"},
    )
    importance: str = Field(
        "calibration",
        description="K types, iq4_nl/iq4_xs and q4_0/q4_1/q5_0/q5_1: each block's scales fitted to the weights'"
        " importance: measured on calibration text (calibration: the mean square of each input, as llama-imatrix"
        " measures it), read from a llama-imatrix file (FILE.gguf, as llama-quantize --imatrix), or none"
        " (llama-quantize's rounding without --imatrix: its very bytes for the K and legacy types); with an"
        " importance, q4_0/q5_0 write the first eighth of the ffn_down matrices in q4_1/q5_1 (as llama-quantize"
        " --imatrix), and without one, iq4_nl/iq4_xs write them in q5_k (as llama-quantize)",
        json_schema_extra={"flag": "--importance", "metavar": "calibration|none|FILE.gguf"},
    )
    calib: str | None = Field(
        None,
        description="the importance's text (.txt, records, a folder of them) [default: embedded Python docs]",
        json_schema_extra={"flag": "--calib"},
    )
    samples: int = Field(64, gt=0, le=2**20, description="importance windows", json_schema_extra={"flag": "--samples"})
    seq_len: int | None = Field(
        None,
        gt=1,
        le=2**20,
        description="tokens per importance window [default: 512, or the model's context if shorter]",
        json_schema_extra={"flag": "--seq-len"},
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="seed of the importance windows' sampling",
        json_schema_extra={"flag": "--seed"},
    )
    target_size: str | None = Field(
        None,
        description="the file's size (105MB, 100MiB, 2GB): each matrix's type chosen (K types, IQ4, legacy, Q8_0,"
        " F16) to least predicted damage (its Fisher-weighted rounding error on the calibration windows) within it",
        json_schema_extra={"flag": "--target-size", "metavar": "SIZE"},
    )
    target_bpw: float | None = Field(
        None,
        gt=0,
        le=32,
        description="as --target-size, for bits per weight over every tensor (as llama.cpp prints BPW)",
        json_schema_extra={"flag": "--target-bpw"},
    )

    @field_validator("importance")
    @classmethod
    def _an_importance(cls, v: str) -> str:
        if v not in ("calibration", "none") and not (v.endswith(".gguf") and Path(v).is_file()):
            raise ValueError(f"expected calibration, none or an existing llama-imatrix .gguf file, got {v!r}")
        return v

    @field_validator("target_size")
    @classmethod
    def _a_size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> GgufConfig:
        if self.target_size is not None and self.target_bpw is not None:
            raise ValueError("--target-size and --target-bpw are two budgets; give one")
        if (self.target_size is not None or self.target_bpw is not None) and self.tensor_type != "auto":
            flag = "--target-size" if self.target_size is not None else "--target-bpw"
            raise ValueError(f"{flag} chooses each matrix's type; --type {self.tensor_type} asks for one: give one")
        return self


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # the file name's suffix the output must have
    config: type[StrictModel]
    writer: str  # "module:function", imported when the format runs
    help: str
    examples: str

    def write(
        self, model: str | Path, out: str | Path, config: StrictModel, overwrite: bool, progress: Progress
    ) -> dict[str, Any]:
        module, _, function = self.writer.partition(":")
        return getattr(importlib.import_module(module), function)(model, Path(out), config, overwrite, progress)


FORMATS: dict[str, ExportFormat] = {
    "gguf": ExportFormat(
        name="gguf",
        suffix=".gguf",
        config=GgufConfig,
        writer="sparsify.export.gguf:write_gguf",
        help="One GGUF file for llama.cpp and Ollama: quantized layouts kept as stored where GGUF has them.",
        examples="Examples: sparsify export gguf ./model-w4 -o model-w4.gguf;"
        " sparsify export gguf ./model-wanda50 -o model.gguf --type q8_0",
    ),
}


def export(
    model: str | Path,
    out: str | Path,
    format: str = "gguf",
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write ``model`` (a folder, sparsify's output or any supported checkpoint) to ``out`` in ``format``;
    ``options`` are the format's config fields (``tensor_type="q8_0"``). Returns the summary."""
    if format not in FORMATS:
        raise SparsifyError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    if Path(out).suffix != fmt.suffix:
        raise SparsifyError(f"{out} does not end in {fmt.suffix}; name the {format.upper()} file to write")
    try:
        config = fmt.config.model_validate(options)
    except ValidationError as e:
        from sparsify.recipe import format_validation_error

        flags = {n: (f.json_schema_extra or {}).get("flag", n) for n, f in fmt.config.model_fields.items()}
        raise SparsifyError(format_validation_error(e, f"export {format}", {"": "", **flags})) from None
    return fmt.write(model, out, config, overwrite, progress or NoProgress())
