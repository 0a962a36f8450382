"""``sparsify.load``: a checkpoint sparsify wrote (or any compressed-tensors one), back as a model.

The top of the loading side: it reads the checkpoint's config (:mod:`sparsify.runtime.format`), registers
what runs sparsify's attention patterns (:mod:`sparsify.runtime.attention`) and builds a compressed-tensors
checkpoint itself, on int kernels on the CPU (:func:`load_compressed`): the model is built from its config
on the meta device with every quantized Linear as a :class:`~sparsify.runtime.quantized.QuantizedLinear`,
each checkpoint tensor is checked against it and loaded as stored (integers stay integers), and each module
gets the kernel :func:`~sparsify.runtime.quantized.choose_kernels` measures fastest on this machine.
Schemes sparsify does not run (FP8, NVFP4, ...) go to transformers' own compressed-tensors loader
instead, with a log line saying so. Native checkpoints load as transformers loads them.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.arch import is_encoder, lookup
from sparsify.checkpoint import KeyMap, build_skeleton, check_tensors, materialize, open_model, set_tensor
from sparsify.checkpoint.compressed_tensors import can_run, is_compressed_tensors
from sparsify.checkpoint.skeleton import tied_names
from sparsify.errors import SparsifyError
from sparsify.runtime.attention import register
from sparsify.runtime.cache import bounded_cache
from sparsify.runtime.format import CONFIG_KEY, IMPLEMENTATION, patterns_from_config, read_config
from sparsify.runtime.moe import zero_width_quiet
from sparsify.runtime.quantized import QuantizedLinear, choose_kernels, describe_choices

log = logging.getLogger(__name__)


def load(path: str | Path, *, trust_remote_code: bool = False, kernel: str = "auto", **kwargs: Any) -> nn.Module:
    """Load a checkpoint sparsify wrote, with its attention patterns active and its quantized Linears on
    int kernels; native ones load as usual.

    Causal models come back as ``AutoModelForCausalLM``, encoders as ``AutoModel``; ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...). A compressed-tensors checkpoint (sparsify's or
    another tool's) is built by sparsify itself (:func:`load_compressed`); ``kernel`` picks
    its int kernel (``auto``: measured on this machine; ``exact``: likewise among the kernels that keep
    the checkpoint's numerics; see :mod:`sparsify.runtime.quantized`), and
    ``model.sparsify_kernels`` says what was chosen.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    config = read_config(path, trust_remote_code)
    encoder = is_encoder(config.model_type)
    cls = AutoModel if encoder else AutoModelForCausalLM
    patterns = getattr(config, CONFIG_KEY, None) is not None
    if patterns:
        layers, causal = patterns_from_config(config)
        if len(layers) != config.num_hidden_layers:
            raise SparsifyError(f"{CONFIG_KEY} has {len(layers)} layers, the model {config.num_hidden_layers}")
        register()
        kwargs["attn_implementation"] = IMPLEMENTATION
    if is_compressed_tensors(config):
        reason = can_run(config)
        if reason is None:
            model = load_compressed(path, config, encoder, trust_remote_code, kernel, **kwargs)
            if patterns and causal and any(p.evicts for p in layers):
                _with_bounded_generate(model)
            return model
        log.info("compressed-tensors scheme sparsify does not run (%s): transformers loads it", reason)
    with zero_width_quiet():  # a Qwen2-MoE written without shared experts: its shared expert is zero-wide
        model = cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if not patterns:
        return model
    if causal and any(p.evicts for p in layers):
        _with_bounded_generate(model)
    return model


def _with_bounded_generate(model: nn.Module) -> None:
    """``model.generate`` gets a bounded cache unless the caller passes one."""
    generate = model.generate

    @functools.wraps(generate)
    def bounded_generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["cache"] = bounded_cache(model)
        return generate(*args, **kwargs)

    model.generate = bounded_generate


@torch.no_grad()
def load_compressed(
    path: str | Path, config: Any, encoder: bool, trust_remote_code: bool = False, kernel: str = "auto", **kwargs: Any
) -> nn.Module:
    """The model at ``path`` with its quantized Linears as :class:`QuantizedLinear` (see the module docstring).

    ``kwargs``: ``dtype`` (float dtype of everything not quantized; default the config's, else float32),
    ``device`` (default cpu). ``kernel``: ``auto`` (measure) or one of ``QuantizedLinear.kernels()``.
    """
    from transformers import GenerationConfig

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
