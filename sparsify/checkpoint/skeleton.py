"""The model on the meta device, checked against the checkpoint, filled one module at a time."""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from sparsify.checkpoint.source import TensorSource
from sparsify.errors import SparsifyError


class KeyMap:
    """Model parameter names ↔ checkpoint keys, renamed as transformers renames them on load.

    transformers 5 keeps a table of key renamings per family (GPT-NeoX's ``embed_out`` is the model's
    ``lm_head``, old BERT checkpoints say ``gamma``/``beta``, a checkpoint may omit or add the base-model
    prefix); sparsify uses the same table, reads each tensor under the checkpoint's own key and writes it
    back under that key. Tensors that transformers *converts* on load (fused or split on the fly) are
    listed in ``converted``.
    """

    def __init__(self, model: nn.Module, source: TensorSource):
        renamings, converters = _conversions(model)
        if _has_per_expert_blocks(model):  # experts one Linear each, as stored: nothing to fuse
            converters = []
        prefix = getattr(model, "base_model_prefix", "") or None
        meta = model.state_dict(keep_vars=True)
        self.to_ckpt: dict[str, str] = {}
        self.converted: list[str] = []
        for key in source.keys():
            name = _renamed(key, renamings, converters, prefix, meta)
            if name is None:
                self.converted.append(key)
                continue
            if name not in meta:
                continue
            if name in self.to_ckpt:
                raise SparsifyError(f"checkpoint tensors {self.to_ckpt[name]} and {key} both load into {name}")
            self.to_ckpt[name] = key
        # module path -> its path in the checkpoint, where the two differ only before the tensor's own name
        self._module_keys = {
            n.rpartition(".")[0]: k.rpartition(".")[0]
            for n, k in self.to_ckpt.items()
            if k.rpartition(".")[2] == n.rpartition(".")[2]
        }

    def output_key(self, name: str) -> str:
        """The checkpoint key for model parameter ``name``: its input key, or for a new tensor (a bias, a
        quantized weight's scale) its module's key in the checkpoint (Mixtral's ``block_sparse_moe`` for the
        model's ``mlp``), else the name under the checkpoint's prefix convention (``bert.`` added or not)."""
        if name in self.to_ckpt:
            return self.to_ckpt[name]
        module, _, leaf = name.rpartition(".")
        if module in self._module_keys:
            return f"{self._module_keys[module]}.{leaf}"
        add, strip = self._prefix_rule()
        return add + name.removeprefix(strip)

    def _prefix_rule(self) -> tuple[str, str]:
        """``(added, stripped)``: how checkpoint keys differ from model names, read off the dotted pairs."""
        for name, key in self.to_ckpt.items():
            if key == name:
                continue
            if key.endswith("." + name):
                return key[: -len(name)], ""
            if name.endswith("." + key):
                return "", name[: -len(key)]
        return "", ""

    def require(self, names: list[str]) -> list[str]:
        missing = [n for n in names if n not in self.to_ckpt]
        if missing:
            raise SparsifyError(
                f"checkpoint has no tensor for {missing[0]} ({len(missing)} missing): incomplete or mismatched checkpoint"
            )
        return [self.to_ckpt[n] for n in names]


def _has_per_expert_blocks(model: nn.Module) -> bool:
    from sparsify.runtime.moe import MoEBlock

    return any(isinstance(m, MoEBlock) for m in model.modules())


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers' key renamings and converters for ``model`` (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover
        return [], []
    transforms = get_model_conversion_mapping(model)
    return [t for t in transforms if isinstance(t, WeightRenaming)], [
        t for t in transforms if not isinstance(t, WeightRenaming)
    ]


def _renamed(key: str, renamings: list, converters: list, prefix: str | None, meta: dict) -> str | None:
    """The model name transformers loads ``key`` into; None if a converter (fuse/split) takes it."""
    try:
        from transformers.core_model_loading import rename_source_key
    except ImportError:  # pragma: no cover
        rename_source_key = None
    if rename_source_key is not None:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta)
        return None if converter is not None else name
    for candidate in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}"):
        if candidate in meta:
            return candidate
    return key


def build_skeleton(
    config, encoder: bool, trust_remote_code: bool, dtype: torch.dtype | None, keys: set[str] | None = None
) -> nn.Module:
    """The model with parameters on the meta device (buffers stay real: rotary tables, masks), as its
    checkpoint stores it (``keys``: the checkpoint's tensor names; None: as sparsify writes it): a
    compressed-tensors checkpoint's quantized Linears are :class:`~sparsify.runtime.quantized.QuantizedLinear`
    (with the optional tensors ``keys`` has, such as ``weight_g_idx``); the experts of a MoE family stored one
    by one (as sparsify writes them) are one Linear each (:class:`~sparsify.runtime.moe.MoEBlock`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from sparsify.runtime.attention import register
    from sparsify.runtime.format import CONFIG_KEY

    if getattr(config, CONFIG_KEY, None) is not None:
        register()  # a checkpoint with sparsify attention patterns calibrates with them active
    from sparsify.runtime.moe import zero_width_quiet

    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=False), zero_width_quiet():
            model = auto.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as e:
        raise SparsifyError(f"transformers cannot build model_type {config.model_type!r}: {e}") from e
    from sparsify.checkpoint.compressed_tensors import (
        add_g_idx,
        is_compressed_tensors,
        quantization_dict,
        quantize_skeleton,
    )
    from sparsify.runtime.moe import per_expert_blocks

    if keys is None or any(".experts.0." in k for k in keys):  # experts stored one by one (a fused layout: kept)
        per_expert_blocks(model, config)
    if is_compressed_tensors(config):
        quantize_skeleton(model, quantization_dict(config), dtype)
        add_g_idx(model, keys or set())
    return model.eval()


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied parameter -> the parameter it is when loaded (``lm_head.weight`` -> the embeddings), where the model
    says which (transformers 5's ``all_tied_weights_keys``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def tied_names(model: nn.Module) -> set[str]:
    """Parameters that are tied to another (e.g. ``lm_head.weight`` to the embeddings) when loaded."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: only the ties the config enables
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) if getattr(model.config, "tie_word_embeddings", False) else {}
    return set(tied) if isinstance(tied, dict | list | tuple | set) else set()


def check_tensors(
    model: nn.Module,
    source: TensorSource,
    keymap: KeyMap,
    optional: tuple[str, ...] = (),
    converted_ok: bool = False,
) -> tuple[list[str], list[str]]:
    """Compare every tensor of the checkpoint with the model built from its config.

    A shape that differs is an error naming the tensor; so is an integer tensor where the model holds
    floating-point weights, and a parameter the model needs that the checkpoint lacks (tied parameters are
    not needed). Returns the parameters that are absent but
    ``optional`` (module paths, e.g. an encoder's ``pooler``) and the checkpoint keys the model does
    not have (copied to the output unchanged).
    """
    tied = tied_names(model)
    absent: list[str] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = keymap.to_ckpt.get(name)
        if key is None:
            if name in tied or not isinstance(tensor, nn.Parameter) or tensor.numel() == 0:  # (an empty shared expert)
                continue
            if any(name == o or name.startswith(o + ".") for o in optional):
                absent.append(name)
                continue
            if keymap.converted and converted_ok:  # fused on load by transformers (MoE experts): it checks them
                continue
            if keymap.converted:
                raise SparsifyError(
                    f"transformers builds {name} on load by converting checkpoint tensors (e.g."
                    f" {keymap.converted[0]}); sparsify cannot compress that layout yet"
                )
            raise SparsifyError(
                f"checkpoint has no tensor for {name}, which the model needs (config.json builds it with shape"
                f" {tuple(tensor.shape)}): incomplete or mismatched checkpoint"
            )
        stored = source.info(key)
        if stored.shape != tuple(tensor.shape):
            raise SparsifyError(
                f"tensor {key} has shape {stored.shape} but config.json implies {tuple(tensor.shape)}:"
                " the weights do not match the config"
            )
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point() and not stored.dtype.is_floating_point:
            raise SparsifyError(
                f"tensor {key} is stored as {str(stored.dtype).removeprefix('torch.')}, but the model config.json"
                " builds holds floating-point values there (config.json does not say the checkpoint is quantized):"
                " the weights do not match the config"
            )
    known = set(keymap.to_ckpt.values()) | set(keymap.converted)
    unexpected = [k for k in source.keys() if k not in known]
    return absent, unexpected


def check_layer_count(source: TensorSource, layers_path: str, num_layers: int) -> None:
    """Refuse at once a config that asks for more layers than the checkpoint has (before building a model that big)."""
    pattern = re.compile(r"(?:^|\.)" + re.escape(layers_path) + r"\.(\d+)\.")
    found = {int(m[1]) for key in source.keys() if (m := pattern.search(key))}
    if found and num_layers > len(found):
        raise SparsifyError(
            f"config.json says {num_layers} layers but the checkpoint holds {len(found)} ({layers_path}.0 to"
            f" {layers_path}.{max(found)}): the weights do not match the config"
        )


def verify(source: TensorSource, config, arch_layers: str | None, optional: tuple[str, ...], encoder: bool,
           trust_remote_code: bool = False) -> list[str]:  # fmt: skip
    """Every tensor the model built from ``config`` needs is in the checkpoint with its shape (what loading
    with transformers would otherwise paper over with random weights); returns notes."""
    if arch_layers:
        check_layer_count(source, arch_layers, int(config.num_hidden_layers))
    model = build_skeleton(config, encoder, trust_remote_code, None, set(source.keys()))
    keymap = KeyMap(model, source)
    absent, unexpected = check_tensors(model, source, keymap, optional, converted_ok=True)
    notes = [f"not in the checkpoint (optional): {', '.join(absent)}"] if absent else []
    if unexpected:
        notes.append(f"{len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]}")
    return notes


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
    """Move a module's parameters back to the meta device, freeing their memory (and giving it back)."""
    for name, p in list(root.named_parameters()):
        set_tensor(root, name, torch.empty_like(p, device="meta"))
    _trim_heap()


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc). Without it, layer after layer of same-sized tensors
    fragments the heap and peak RSS grows with depth (measured: 1.26 vs 0.87 GB for 16 layers)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc
