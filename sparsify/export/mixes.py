"""llama-quantize's named file types (``Q3_K_M``, ``Q4_K_M``, ...): which type each matrix takes, by name and layer.

A llama.cpp user picks a file by these names. Each is a base K type and a few rules, by tensor name and layer,
that give some matrices more bits (llama.cpp's ``src/llama-quant.cpp``, ``llama_tensor_get_type_impl``, in the
11434 sources): the output head (and a token embedding tied to it) in Q6_K; in ``_M`` and ``_L`` files the
value projection ``attn_v`` and the MLP's ``ffn_down`` of some layers in more bits (``use_more_bits``: the first
and last eighth of the layers and every third between). Here as data, :data:`MIXES`; the writer then takes
llama-quantize's fallback where a row is not whole super-blocks (``gguf_plan._choose_k``), as llama-quantize does.

Written for dense decoders: llama.cpp's further rules for 8-expert models, Falcon and 70B Llamas are not followed
(a model with experts is refused, ``gguf_plan.plan``). The blocks are fitted by sparsify (to the calibration
importance by default), so a file named like llama.cpp's holds the same types, tensor for tensor, and the same
bytes, but its own rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

Rule = Callable[[int, int], "str | None"]  # (layer, layers) -> the tensor's type, None for the mix's base type


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _always(name: str) -> Rule:
    return lambda layer, layers: name


def _more_bits(name: str) -> Rule:
    return lambda layer, layers: name if more_bits(layer, layers) else None


@dataclass(frozen=True)
class Mix:
    base: str  # the K type of every matrix no rule names
    rules: dict[str, Rule] = field(default_factory=dict)  # GGUF tensor kind (attn_v, ffn_down, ...) -> its rule
    file_type: str = ""  # gguf.LlamaFileType member written as general.file_type


MIXES: dict[str, Mix] = {
    "q3_k_s": Mix("q3_k", file_type="MOSTLY_Q3_K_S"),
    "q3_k_m": Mix(
        "q3_k",
        {
            "attn_v": lambda layer, layers: "q5_k" if layer < 2 else "q4_k",
            "ffn_down": lambda layer, layers: "q5_k" if layer < layers // 16 else "q4_k",
            "attn_output": _always("q4_k"),
        },
        "MOSTLY_Q3_K_M",
    ),
    "q3_k_l": Mix(
        "q3_k",
        {"attn_v": _always("q5_k"), "ffn_down": _always("q5_k"), "attn_output": _always("q5_k")},
        "MOSTLY_Q3_K_L",
    ),
    "q4_k_s": Mix(
        "q4_k",
        {
            "attn_v": lambda layer, layers: "q5_k" if layer < 4 else None,
            "ffn_down": lambda layer, layers: "q5_k" if layer < layers // 8 else None,
        },
        "MOSTLY_Q4_K_S",
    ),
    "q4_k_m": Mix("q4_k", {"attn_v": _more_bits("q6_k"), "ffn_down": _more_bits("q6_k")}, "MOSTLY_Q4_K_M"),
    "q5_k_s": Mix("q5_k", file_type="MOSTLY_Q5_K_S"),
    "q5_k_m": Mix("q5_k", {"attn_v": _more_bits("q6_k"), "ffn_down": _more_bits("q6_k")}, "MOSTLY_Q5_K_M"),
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_type(mix: str, name: str, layers: int, tied: bool) -> str:
    """The type (before the shape fallback) llama-quantize gives the GGUF matrix ``name`` in the file type ``mix``;
    ``tied``: the token embedding is also the output head (the file has no ``output.weight``)."""
    m = MIXES[mix]
    kind = name.split(".")[-2]
    if kind == "output" or (tied and kind == "token_embd"):
        return "q6_k"
    rule, at = m.rules.get(kind), _LAYER.match(name)
    if rule is None or at is None:
        return m.base
    return rule(int(at[1]), layers) or m.base
