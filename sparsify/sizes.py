"""Where a checkpoint's bytes go: each tensor name classified into a part of the model, sizes summed per part.

Pure functions over names and numbers (no tensors are read): the pipeline hands over ``(name, bytes,
parameters)`` for the input and the output, and the report stores ``{part: {"bytes", "parameters"}}`` for each.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsify.arch import Arch

# In display order. "embeddings" holds the token/position embeddings and the LM head (often tied to them).
PARTS = ("embeddings", "attention", "mlp", "experts", "norms", "other")
PART_LABELS = {
    "embeddings": "embeddings + LM head",
    "attention": "attention",
    "mlp": "MLP",
    "experts": "experts",
    "norms": "norms",
    "other": "other",
}
# Quantization metadata stored next to a weight: bytes on disk, but no parameters of the model.
METADATA_SUFFIXES = ("_scale", "_zero_point", "_shape", "_g_idx", ".g_idx", "_global_scale")
LM_HEADS = ("lm_head", "embed_out")  # gpt_neox calls its LM head embed_out
# Families sparsify writes whose MoE block is not at the table's ``mlp`` path (Mixtral's block_sparse_moe).
MLP_ALIASES = ("block_sparse_moe",)


def fmt_bytes(n: float) -> str:
    """``804.0 MiB``: bytes in binary units, as every size sparsify prints reads."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size as people write it: ``105MB`` / ``105M`` (10**6), ``100MiB`` (2**20), ``2GB``, ``4096``
    (bytes); ValueError naming what is expected otherwise."""
    m = _SIZE.match(str(text))
    if not m or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a size: write e.g. 105MB, 100MiB or 2GB")
    power = "kmgt".find(m[2].lower()) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def folder_bytes(path: Path) -> int:
    """The bytes of every file below ``path`` (0 if it is not a folder); a file renamed or removed meanwhile by
    another process counts nothing."""
    total = 0
    for f in path.rglob("*") if path.is_dir() else []:
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _stem(name: str) -> str:
    """The module path of a tensor name (``...q_proj.weight`` → ``...q_proj``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _suffixes(path: str) -> list[str]:
    """``a.b.c`` → ``a.b.c``, ``b.c``, ``c``: checkpoints drop or add the base model's prefix (``transformer.``,
    ``bert.``), so a table path is matched by its tail too."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _at(path: str, name: str) -> bool:
    """Whether the module path ``path`` (or its tail) is ``name``'s module or one of its parents."""
    dotted = "." + name + "."
    return any(f".{p}." in dotted for p in _suffixes(path) if p)


def _in_layer(arch: Arch, rest: str) -> str:
    """The part of a tensor inside a layer, from the table (``rest`` is relative to the layer)."""
    under = lambda prefix: prefix and (rest == prefix or rest.startswith(prefix + "."))  # noqa: E731
    if under(arch.attention):
        return "attention"
    if under(arch.mlp) or any(under(a) for a in MLP_ALIASES):
        return "mlp"
    if any(under(n) for n in (*arch.mlp_in, arch.mlp_out)):
        return "mlp"
    if any(under(n) for n in (*arch.attn_in, arch.attn_out)):
        return "attention"
    return "other"


def _by_keyword(name: str) -> str:
    """A family the table does not know: the usual words."""
    low = name.lower()
    if any(w in low for w in ("embed", "wte", "wpe")):
        return "embeddings"
    if any(w in low for w in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(w in low for w in ("mlp", "ffn", "feed_forward", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return "other"


def tensor_part(name: str, model_type: str | None) -> str:
    """The part of the model a checkpoint tensor belongs to: one of :data:`PARTS`.

    Experts (``.experts.``, ``shared_expert``) and norms (``norm``, ``ln_``, ``LayerNorm``) by name; embeddings
    and the LM head, attention and MLP from the architecture table (``sparsify.arch.lookup``), by keyword for a
    family it does not know. A MoE block's router counts as MLP.
    """
    low = name.lower()
    if ".experts." in low or low.startswith("experts.") or "shared_expert" in low:
        return "experts"
    if "norm" in low or "ln_" in low:
        return "norms"
    stem = _stem(name)
    if any(_at(head, stem) for head in LM_HEADS):
        return "embeddings"
    from sparsify.arch import lookup  # the table imports torch: only when a name needs it

    arch = lookup(model_type) if model_type else None
    if arch is None:
        return _by_keyword(name)
    if any(_at(e, stem) for e in arch.embeddings):
        return "embeddings"
    for layers in _suffixes(arch.layers):
        m = re.search(rf"(?:^|\.){re.escape(layers)}\.\d+\.(.+)$", stem)
        if m:
            return _in_layer(arch, m.group(1))
    return "other"


def tensor_parameters(name: str, shape: Iterable[int], num_bits: int | None = None) -> int:
    """How many of the model's parameters a stored tensor holds: its elements; none for quantization metadata
    (scales, zero points, shapes, group indices); ``32 / num_bits`` per int32 of a packed ``weight_packed``."""
    n = 1
    for s in shape:
        n *= int(s)
    if name.endswith(METADATA_SUFFIXES):
        return 0
    if name.endswith("weight_packed") and num_bits:
        return n * (32 // num_bits)
    return n


def size_breakdown(entries: Iterable[tuple[str, int, int]], model_type: str | None) -> dict[str, dict[str, int]]:
    """``(name, bytes, parameters)`` triples summed per part: ``{part: {"bytes": int, "parameters": int}}``, parts
    in :data:`PARTS` order, only those present."""
    sums: dict[str, dict[str, int]] = {}
    for name, nbytes, params in entries:
        part = sums.setdefault(tensor_part(name, model_type), {"bytes": 0, "parameters": 0})
        part["bytes"] += int(nbytes)
        part["parameters"] += int(params)
    return {p: sums[p] for p in PARTS if p in sums}


def packed_bits(config: dict[str, Any] | None) -> int | None:
    """The weight bits of a compressed-tensors ``quantization_config`` (None when not quantized or mixed)."""
    groups = ((config or {}).get("quantization_config") or {}).get("config_groups") or {}
    bits = {(g.get("weights") or {}).get("num_bits") for g in groups.values() if isinstance(g, dict)}
    bits.discard(None)
    return bits.pop() if len(bits) == 1 else None


def source_sizes(source: Any, config: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The size breakdown of a checkpoint from its tensors' headers (``source.keys()``, ``source.info(key)`` with
    ``shape`` and ``nbytes``: a :class:`sparsify.checkpoint.source.TensorSource`) and its ``config.json`` as a dict.

    For the report: ``report["sizes"] = {"input": source_sizes(...), "output": source_sizes(...)}``.
    """
    bits = packed_bits(config)
    entries = []
    for key in source.keys():
        info = source.info(key)
        entries.append((key, info.nbytes, tensor_parameters(key, info.shape, bits)))
    return size_breakdown(entries, config.get("model_type"))
