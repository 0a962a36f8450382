"""llama-quantize's named file types (``Q3_K_M``, ``Q4_K_M``, ...): which type each matrix takes, by name and layer.

A llama.cpp user picks a file by these names. Each is a base K type and a few rules, by tensor name and layer,
that give some matrices more bits (llama.cpp's ``src/llama-quant.cpp``, ``llama_tensor_get_type_impl``, in the
11434 sources): the output head (and a token embedding tied to it) in Q6_K; in ``_M`` and ``_L`` files the
value projection ``attn_v`` and the MLP's ``ffn_down`` of some layers in more bits (``use_more_bits``: the first
and last eighth of the layers and every third between). Here as data, :data:`MIXES`; the writer then takes
llama-quantize's fallback where a row is not whole super-blocks (``gguf_plan._choose_k``), as llama-quantize does.
The file types sparsify otherwise writes in one type have such rules too, :data:`TYPE_RULES`, :func:`type_of`:
with an imatrix (an importance, here), a Q4_0 (Q5_0) file's ``ffn_down`` in the first eighth of the layers in Q4_1
(Q5_1); an IQ4_NL or IQ4_XS file's ``attn_v`` in Q5_K where ``n_gqa`` (attention heads per key/value head) is 4 or
more, with or without an imatrix, and, without one, its ``ffn_down`` in the first eighth of the layers in Q5_K. Each
rule reads :class:`Facts`; a fused ``attn_qkv`` (Phi-3) takes ``attn_v``'s rule, as llama.cpp's
``category_is_attn_v`` has it.

Written for dense decoders: llama.cpp's further rules for models with experts (their stacked ``ffn_down_exps``,
left here in the file's type; 8-expert models' attention), Falcon and 70B Llamas are not followed (a named mix
refuses a model with experts, ``gguf_plan.plan``). The blocks are fitted by sparsify (to the calibration
importance by default), so a file named like llama.cpp's holds the same types, tensor for tensor, and the same
bytes, but its own rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Facts:
    """What llama-quantize's rules read of one matrix: its layer, the model's layer count, ``n_gqa`` (attention heads
    per key/value head, ``n_head / n_head_kv`` in integers), and whether an imatrix is in use (``qs.has_imatrix``;
    here: the blocks are fitted to an importance)."""

    layer: int
    layers: int
    gqa: int = 1
    imatrix: bool = False


Rule = Callable[[Facts], "str | None"]  # the matrix's type, None for the file's base type


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _always(name: str) -> Rule:
    return lambda m: name


def _more_bits(name: str) -> Rule:
    return lambda m: name if more_bits(m.layer, m.layers) else None


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
            "attn_v": lambda m: "q5_k" if m.layer < 2 else "q4_k",
            "ffn_down": lambda m: "q5_k" if m.layer < m.layers // 16 else "q4_k",
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
            "attn_v": lambda m: "q5_k" if m.layer < 4 else None,
            "ffn_down": lambda m: "q5_k" if m.layer < m.layers // 8 else None,
        },
        "MOSTLY_Q4_K_S",
    ),
    "q4_k_m": Mix("q4_k", {"attn_v": _more_bits("q6_k"), "ffn_down": _more_bits("q6_k")}, "MOSTLY_Q4_K_M"),
    "q5_k_s": Mix("q5_k", file_type="MOSTLY_Q5_K_S"),
    "q5_k_m": Mix("q5_k", {"attn_v": _more_bits("q6_k"), "ffn_down": _more_bits("q6_k")}, "MOSTLY_Q5_K_M"),
}

# llama-quantize's rules for the file types written otherwise in one type, by --type
_IQ4: dict[str, Rule] = {
    "attn_v": lambda m: "q5_k" if m.gqa >= 4 else None,  # with or without an imatrix
    "ffn_down": lambda m: "q5_k" if not m.imatrix and m.layer < m.layers // 8 else None,  # without one only
}
TYPE_RULES: dict[str, dict[str, Rule]] = {
    # with an imatrix only ("Q4_1/Q5_1 do go crazy on ffn_down without an imatrix", llama-quant.cpp)
    "q4_0": {"ffn_down": lambda m: "q4_1" if m.imatrix and m.layer < m.layers // 8 else None},
    "q5_0": {"ffn_down": lambda m: "q5_1" if m.imatrix and m.layer < m.layers // 8 else None},
    "iq4_nl": _IQ4,
    "iq4_xs": _IQ4,
}

_LAYER = re.compile(r"^blk\.(\d+)\.")
_ATTN_V = ("attn_qkv", "attn_kv_b")  # llama.cpp's category_is_attn_v: these take attn_v's rule


def _by_rule(rules: dict[str, Rule], name: str, layers: int, gqa: int, imatrix: bool) -> str | None:
    """The type ``rules`` give the GGUF matrix ``name`` (``blk.<layer>.<kind>.weight``), None where none does."""
    kind = name.split(".")[-2]
    rule, at = rules.get("attn_v" if kind in _ATTN_V else kind), _LAYER.match(name)
    return None if rule is None or at is None else rule(Facts(int(at[1]), layers, gqa, imatrix))


def tensor_type(mix: str, name: str, layers: int, tied: bool, gqa: int = 1, imatrix: bool = False) -> str:
    """The type (before the shape fallback) llama-quantize gives the GGUF matrix ``name`` in the file type ``mix``;
    ``tied``: the token embedding is also the output head (the file has no ``output.weight``)."""
    m = MIXES[mix]
    kind = name.split(".")[-2]
    if kind == "output" or (tied and kind == "token_embd"):
        return "q6_k"
    return _by_rule(m.rules, name, layers, gqa, imatrix) or m.base


def type_of(want: str, name: str, layers: int, gqa: int = 1, imatrix: bool = False) -> str:
    """The type (before the shape fallback) llama-quantize gives the GGUF matrix ``name`` of a ``--type want`` file
    (not a mix): :data:`TYPE_RULES`'s, else ``want`` (the output head's is ``gguf_plan._choose``'s)."""
    return _by_rule(TYPE_RULES.get(want, {}), name, layers, gqa, imatrix) or want
