"""The compressed-tensors format: its ``quantization_config`` both ways, and the model as such a checkpoint stores it.

Writing: :func:`quantization_config` builds the config with compressed-tensors' own classes
(``QuantizationConfig``, ``QuantizationScheme``, ``QuantizationArgs``): one config group per distinct
scheme, ``targets: ["Linear"]`` when one scheme covers the model and every other Linear (``lm_head``)
listed in ``ignore`` by name.

Reading: :func:`read_schemes` turns a checkpoint's config groups into :class:`QuantScheme` (or says
why sparsify cannot run them, e.g. FP8 or NVFP4: those are left to transformers), and
:func:`quantize_skeleton` swaps each Linear the groups target (compressed-tensors' own matching:
``re:`` prefix regexes with ``re.match``, exact names, class names) for a :class:`QuantizedLinear` on
the meta device, so the checkpoint's tensors can be checked and loaded one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from sparsify.algorithms.quant import PerChannel, PerGroup, PerTensor, QuantArgs
from sparsify.errors import SparsifyError
from sparsify.runtime.quantized import QuantizedLinear, QuantScheme

QUANT_METHOD = "compressed-tensors"


def is_compressed_tensors(cfg: Any) -> bool:
    """Whether a config (dict or object) carries a compressed-tensors ``quantization_config``."""
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else getattr(cfg, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def quantization_dict(cfg: Any) -> dict[str, Any] | None:
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else getattr(cfg, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def can_run(config: Any) -> str | None:
    """None if sparsify runs this compressed-tensors checkpoint itself, else why not."""
    qc = quantization_dict(config)
    if qc is None:
        return "no quantization_config"
    return read_schemes(qc)[2]


# -------------------------------------------------------------------------------------- writing


def _weight_args(scheme: QuantScheme):
    from compressed_tensors.quantization import QuantizationArgs

    w = scheme.weights
    g = w.granularity
    strategy = "group" if isinstance(g, PerGroup) else "channel" if isinstance(g, PerChannel) else "tensor"
    return QuantizationArgs(
        num_bits=w.bits,
        type="int",
        symmetric=w.symmetric,
        strategy=strategy,
        group_size=g.size if isinstance(g, PerGroup) else None,
        dynamic=False,
    )


def _input_args(scheme: QuantScheme):
    from compressed_tensors.quantization import QuantizationArgs

    if scheme.activations is None:
        return None
    dynamic = scheme.activations == "dynamic"
    return QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="token" if dynamic else "tensor", dynamic=dynamic
    )


def quantization_config(schemes: dict[str, QuantScheme], linears: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for Linears ``schemes`` (fqn → scheme) among all ``linears``."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    distinct = list(dict.fromkeys(schemes.values()))
    groups = {}
    for i, scheme in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else sorted(f for f, s in schemes.items() if s == scheme)
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=_weight_args(scheme), input_activations=_input_args(scheme), format=scheme.format
        )
    formats = {s.format for s in distinct}
    config = QuantizationConfig(
        config_groups=groups,
        ignore=[f for f in linears if f not in schemes] if len(distinct) == 1 else [],
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    data = config.model_dump(mode="json")
    data["quant_method"] = QUANT_METHOD
    if any(s.packed and not s.weights.symmetric for s in distinct):
        # transformers 5 builds a compressed model on the meta device with compressed-tensors' compress_model,
        # whose meta path leaves weight_zero_point unpacked ((out, groups) int8) while the file holds it packed
        # along the output dimension ((out * bits / 32, groups) int32, as compressed-tensors itself writes it):
        # the load fails on a size mismatch (llm-compressor #1618). transformers reads ``dequantize`` from
        # config.json (CompressedTensorsConfig(**quantization_config)) and then decompresses each Linear from
        # the file's own tensors, packed zero point included. vLLM and compressed-tensors ignore the key.
        data["dequantize"] = True
    try:
        from compressed_tensors import __version__ as ct_version

        data["version"] = ct_version
    except ImportError:  # pragma: no cover
        pass
    return data


# -------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Group:
    targets: tuple[str, ...]
    scheme: QuantScheme | None  # None: sparsify cannot run it (why in ``unsupported``)
    unsupported: str = ""


def _scheme_from(group: dict[str, Any], name: str) -> Group:
    targets = tuple(group.get("targets") or ())
    w, a = group.get("weights"), group.get("input_activations")
    if group.get("output_activations"):
        return Group(targets, None, f"{name}: output activation quantization")
    if not isinstance(w, dict):
        return Group(targets, None, f"{name}: no weight quantization")
    bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    if kind != "int" or bits not in (2, 3, 4, 5, 6, 7, 8):
        return Group(targets, None, f"{name}: {kind}{bits} weights")
    if strategy == "group" or (strategy is None and w.get("group_size")):
        granularity: Any = PerGroup(int(w["group_size"]))
    elif strategy == "channel":
        granularity = PerChannel()
    elif strategy == "tensor":
        granularity = PerTensor()
    else:
        return Group(targets, None, f"{name}: weight strategy {strategy!r}")
    weights = QuantArgs(bits=int(bits), symmetric=bool(w.get("symmetric", True)), granularity=granularity)
    if a is None:
        return Group(targets, QuantScheme(weights, None))
    if a.get("type", "int") != "int" or a.get("num_bits") != 8 or not a.get("symmetric", True):
        return Group(targets, None, f"{name}: {a.get('type')}{a.get('num_bits')} activations")
    if a.get("dynamic") is True and a.get("strategy") == "token":
        return Group(targets, QuantScheme(weights, "dynamic"))
    if a.get("dynamic") is False and a.get("strategy") == "tensor":
        return Group(targets, QuantScheme(weights, "static"))
    return Group(targets, None, f"{name}: activations {a.get('strategy')} dynamic={a.get('dynamic')}")


def read_schemes(qc: dict[str, Any]) -> tuple[list[Group], list[str], str | None]:
    """``(groups, ignore, reason)``: the config groups as schemes; ``reason`` is why sparsify cannot run the
    checkpoint itself (None: it can)."""
    formats = {"int-quantized", "pack-quantized", "naive-quantized"}
    status = qc.get("quantization_status")
    groups = [_scheme_from(g, n) for n, g in (qc.get("config_groups") or {}).items()]
    reasons = [g.unsupported for g in groups if g.scheme is None]
    fmts = {g.get("format") or qc.get("format") for g in (qc.get("config_groups") or {}).values()}
    if not fmts <= formats:
        reasons.append(f"format {', '.join(sorted(str(f) for f in fmts - formats))}")
    if status != "compressed":
        reasons.append(f"quantization_status {status!r}")
    if qc.get("kv_cache_scheme") or qc.get("sparsity_config") or qc.get("transform_config"):
        extra = [k for k in ("kv_cache_scheme", "sparsity_config", "transform_config") if qc.get(k)]
        reasons.append(", ".join(extra))
    return groups, list(qc.get("ignore") or []), "; ".join(reasons) or None


def quantize_skeleton(model: nn.Module, qc: dict[str, Any], dtype: torch.dtype | None) -> dict[str, QuantScheme]:
    """Replace, on the meta device, every Linear the config targets with a :class:`QuantizedLinear`; fqn → scheme."""
    from compressed_tensors.utils.match import match_named_modules

    groups, ignore, reason = read_schemes(qc)
    if reason is not None:
        raise SparsifyError(f"sparsify cannot run this compressed-tensors checkpoint itself: {reason}")
    fmt = {n: g.get("format") or qc.get("format") for n, g in (qc.get("config_groups") or {}).items()}
    found: dict[str, QuantScheme] = {}
    for group, fmt_name in zip(groups, fmt.values(), strict=True):
        assert group.scheme is not None
        scheme = group.scheme
        if (fmt_name == "pack-quantized") != scheme.packed:
            scheme = _with_layout(scheme, fmt_name)
        for fqn, module in list(match_named_modules(model, list(group.targets), ignore)):
            if fqn in found or not isinstance(module, nn.Linear):
                continue
            found[fqn] = scheme
    for fqn, scheme in found.items():
        old = model.get_submodule(fqn)
        g_idx = False
        new = QuantizedLinear(
            old.in_features, old.out_features, scheme, old.bias is not None,
            dtype or old.weight.dtype, "meta", g_idx,
        )  # fmt: skip
        parent, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return found


def add_g_idx(model: nn.Module, keys: set[str]) -> None:
    """Give the modules whose checkpoint carries ``weight_g_idx`` (GPTQ activation-order groups) that tensor."""
    for fqn, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and f"{fqn}.weight_g_idx" in keys:
            module.weight_g_idx = nn.Parameter(
                torch.zeros(module.in_features, dtype=torch.int32, device="meta"), requires_grad=False
            )


def _with_layout(scheme: QuantScheme, fmt: str | None) -> QuantScheme:
    """The scheme stored in the layout ``fmt`` names (weight-only int8 as ``int-quantized``, say)."""
    return replace(scheme, layout="packed" if fmt == "pack-quantized" else "int")
