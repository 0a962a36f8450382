"""What sparsify sees in a model: architecture, layers, target Linears, parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify.arch import find_layers, is_encoder, lookup
from sparsify.checkpoint import build_skeleton, open_model
from sparsify.errors import SparsifyError
from sparsify.modules import weight_matrix
from sparsify.targets import select_targets


def checkpoint_totals(path: str | Path) -> dict[str, Any]:
    """Parameter count, non-zeros and bytes of a checkpoint's floating tensors (reads each tensor once)."""
    md = open_model(path)
    params = nonzeros = nbytes = 0
    floating = [k for k in md.source.keys() if md.source.info(k).dtype.is_floating_point]
    for key, t in md.source.iter_tensors(floating):
        info = md.source.info(key)
        params += t.numel()
        nonzeros += int(t.count_nonzero())
        nbytes += info.nbytes
    return {"path": str(path), "parameters": params, "nonzeros": nonzeros, "bytes": nbytes}


def describe_attention(config: Any) -> str:
    """The attention pattern a config asks for: sparsify's own, the family's native window, or dense."""
    from collections import Counter

    from sparsify.runtime.format import CONFIG_KEY, patterns_from_config

    if getattr(config, CONFIG_KEY, None) is not None:
        patterns, _ = patterns_from_config(config)
        counts = Counter(p.pattern for p in patterns)
        kinds = ", ".join(f"{n} {name}" for name, n in counts.items())
        return f"sparsify patterns ({kinds} of {len(patterns)} layers); load with sparsify.load"
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return "dense"
    types = getattr(config, "layer_types", None) or []
    sliding = sum(t == "sliding_attention" for t in types) if types else config.num_hidden_layers
    return f"native sliding window {window} on {sliding} of {config.num_hidden_layers} layers"


def inspect_model(path: str | Path, trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    md = open_model(path, revision)
    config = md.load_config(trust_remote_code)
    arch = lookup(config.model_type)
    model = build_skeleton(config, is_encoder(config.model_type), trust_remote_code, dtype=None)
    layers_path, layers = find_layers(model, arch)
    try:
        selection = select_targets(model, arch, layers_path, len(layers), None, [], config.model_type)
        first = selection.per_layer[0]
        targets = [{"name": n, "shape": list(weight_matrix(m).shape)} for n, m in first.items()]
        target_params = sum(weight_matrix(m).numel() for per in selection.per_layer.values() for m in per.values())
    except SparsifyError:
        targets, target_params = [], 0
    infos = [md.source.info(k) for k in md.source.keys()]
    dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in infos})
    return {
        "path": str(md.path),
        "model_type": config.model_type,
        "architecture": "table" if arch else "unknown (pass --targets)",
        "layers_path": layers_path,
        "num_layers": len(layers),
        "dtype": ",".join(dtypes),
        "attention": describe_attention(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_parameters": sum(p.numel() for p in layers.parameters()),
        "target_parameters": target_params,
        "bytes": sum(i.nbytes for i in infos),
        "targets_per_layer": targets,
        "embeddings": list(arch.embeddings) if arch else [],
        "norms_per_layer": list(arch.norms) if arch else [],
    }
