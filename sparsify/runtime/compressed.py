"""``sparsify.load`` for compressed-tensors checkpoints (sparsify's own and other tools'): int kernels on the CPU.

The model is built from its config on the meta device with every quantized Linear as a
:class:`~sparsify.runtime.quantized.QuantizedLinear`, each checkpoint tensor is checked against it and
loaded as stored (integers stay integers), and each module gets the kernel :func:`choose_kernels`
measures fastest on this machine. Schemes sparsify does not run (FP8, NVFP4, ...) go to transformers'
own compressed-tensors loader instead, with a log line saying so.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.checkpoint.compressed_tensors import quantization_dict, read_schemes
from sparsify.errors import SparsifyError
from sparsify.runtime.quantized import QuantizedLinear, choose_kernels, describe_choices

log = logging.getLogger(__name__)


def can_run(config: Any) -> str | None:
    """None if sparsify runs this compressed-tensors checkpoint itself, else why not."""
    qc = quantization_dict(config)
    if qc is None:
        return "no quantization_config"
    return read_schemes(qc)[2]


@torch.no_grad()
def load_compressed(
    path: str | Path, config: Any, encoder: bool, trust_remote_code: bool = False, kernel: str = "auto", **kwargs: Any
) -> nn.Module:
    """The model at ``path`` with its quantized Linears as :class:`QuantizedLinear` (see the module docstring).

    ``kwargs``: ``dtype`` (float dtype of everything not quantized; default the config's, else float32),
    ``device`` (default cpu). ``kernel``: ``auto`` (measure) or one of ``QuantizedLinear.kernels()``.
    """
    from transformers import GenerationConfig

    from sparsify.arch import lookup
    from sparsify.checkpoint import KeyMap, build_skeleton, check_tensors, materialize, open_model, set_tensor
    from sparsify.checkpoint.skeleton import tied_names

    unknown = set(kwargs) - {"dtype", "torch_dtype", "device", "device_map", "attn_implementation"}
    if unknown:
        raise SparsifyError(f"sparsify.load of a quantized checkpoint does not take {sorted(unknown)}")
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = kwargs.get("device") or "cpu"
    config = copy.deepcopy(config)
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    md = open_model(path)
    model = build_skeleton(config, encoder, trust_remote_code, dtype, set(md.source.keys()))
    keymap = KeyMap(model, md.source)
    arch = lookup(config.model_type)
    absent, _unexpected = check_tensors(model, md.source, keymap, arch.optional if arch else ())
    tied = tied_names(model)
    names = [n for n, _ in model.named_parameters() if n not in tied and n not in absent]
    materialize(model, "", names, md.source, keymap, dtype, device)
    for name in absent:
        set_tensor(model, name, torch.zeros(model.get_parameter(name).shape, dtype=dtype, device=device))
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))
    model.tie_weights()
    for module in model.modules():  # integer tensors keep their dtype; scales and biases take the compute dtype
        if isinstance(module, QuantizedLinear):
            module.weight_scale.data = module.weight_scale.data.to(dtype)
    if (Path(path) / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(path)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    choices = choose_kernels(quantized, kernel, dtype=dtype if dtype.is_floating_point else torch.float32)
    model.sparsify_kernels = describe_choices(choices)  # what runs each shape, for reports and users
    for line in model.sparsify_kernels:
        log.info("kernel: %s", line)
    return model.eval()
