"""The model on the meta device, checked against the checkpoint, filled one module at a time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsify.checkpoint.source import TensorSource
from sparsify.errors import SparsifyError


class KeyMap:
    """Model parameter names ↔ checkpoint keys (a checkpoint may omit or add the base-model prefix)."""

    def __init__(self, model: nn.Module, source: TensorSource):
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.to_ckpt: dict[str, str] = {}
        for name in model.state_dict(keep_vars=True):
            for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
                if candidate in source:
                    self.to_ckpt[name] = candidate
                    break

    def require(self, names: list[str]) -> list[str]:
        missing = [n for n in names if n not in self.to_ckpt]
        if missing:
            raise SparsifyError(
                f"checkpoint has no tensor for {missing[0]} ({len(missing)} missing): incomplete or mismatched checkpoint"
            )
        return [self.to_ckpt[n] for n in names]


def build_skeleton(config, encoder: bool, trust_remote_code: bool, dtype: torch.dtype | None) -> nn.Module:
    """The model with parameters on the meta device (buffers stay real: rotary tables, masks)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from sparsify.runtime import CONFIG_KEY, register

    if getattr(config, CONFIG_KEY, None) is not None:
        register()  # a checkpoint with sparsify attention patterns calibrates with them active
    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as e:
        raise SparsifyError(f"transformers cannot build model_type {config.model_type!r}: {e}") from e
    return model.eval()


def tied_names(model: nn.Module) -> set[str]:
    """Parameters that are tied to another (e.g. ``lm_head.weight`` to the embeddings) when loaded."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set()


def check_tensors(
    model: nn.Module, source: TensorSource, keymap: KeyMap, optional: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Compare every tensor of the checkpoint with the model built from its config.

    A shape that differs is an error naming the tensor; so is a parameter the model needs that the
    checkpoint lacks (tied parameters are not needed). Returns the parameters that are absent but
    ``optional`` (module paths, e.g. an encoder's ``pooler``) and the checkpoint keys the model does
    not have (copied to the output unchanged).
    """
    tied = tied_names(model)
    absent: list[str] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = keymap.to_ckpt.get(name)
        if key is None:
            if name in tied or not isinstance(tensor, nn.Parameter):
                continue
            if any(name == o or name.startswith(o + ".") for o in optional):
                absent.append(name)
                continue
            raise SparsifyError(
                f"checkpoint has no tensor for {name}, which the model needs (config.json builds it with shape"
                f" {tuple(tensor.shape)}): incomplete or mismatched checkpoint"
            )
        have = source.info(key).shape
        if have != tuple(tensor.shape):
            raise SparsifyError(
                f"tensor {key} has shape {have} but config.json implies {tuple(tensor.shape)}:"
                " the weights do not match the config"
            )
    known = set(keymap.to_ckpt.values())
    unexpected = [k for k in source.keys() if k not in known]
    return absent, unexpected


def set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted, relative to ``root``) with ``value``."""
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def materialize(
    root: nn.Module,
    prefix: str,
    names: list[str],
    source: TensorSource,
    keymap: KeyMap,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Load ``names`` (relative to ``root``, whose full path is ``prefix``) from the checkpoint.

    Floating tensors are cast to ``dtype`` on ``device``; returns each name's tensor as stored.
    """
    full = [f"{prefix}.{n}" if prefix else n for n in names]
    keys = keymap.require(full)
    tensors = source.get_many(keys)
    stored: dict[str, Tensor] = {}
    for name, key in zip(names, keys, strict=True):
        t = tensors[key]
        stored[name] = t
        set_tensor(root, name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    return stored


def release(root: nn.Module) -> None:
    """Move a module's parameters back to the meta device, freeing their memory."""
    for name, p in list(root.named_parameters()):
        set_tensor(root, name, torch.empty_like(p, device="meta"))
