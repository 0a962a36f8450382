"""The model one stage of a run works on: a skeleton checked against the checkpoint, the tensors outside
its layers read, and the keys the layer loop does not write (copied, or renumbered after layers were removed)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsify.arch import find_layers, is_encoder, lookup
from sparsify.checkpoint.skeleton import (
    KeyMap,
    build_skeleton,
    check_layer_count,
    check_tensors,
    materialize,
    set_tensor,
    tied_sources,
)
from sparsify.checkpoint.source import ModelDir


@dataclass
class Layers:
    """Where a sweep finds its layers in the model it runs (the runtime skeleton or a model in memory)."""

    path: str
    modules: nn.ModuleList
    source_index: list[int]  # model layer i is checkpoint layer source_index[i] (after layers were removed)

    @classmethod
    def of(cls, model: nn.Module) -> Layers:
        path, modules = find_layers(model, lookup(str(model.config.model_type)))
        return cls(path, modules, list(range(len(modules))))


@dataclass
class StageModel:
    model: nn.Module  # on the meta device until filled
    keymap: KeyMap
    notes: list[str] = field(default_factory=list)


def open_stage_model(md: ModelDir, config, trust_remote_code: bool, dtype: torch.dtype | None) -> StageModel:
    """The model on the meta device, every tensor of the checkpoint checked against it (names, shapes)."""
    arch = lookup(config.model_type)
    if arch is not None:
        check_layer_count(md.source, arch.layers, int(config.num_hidden_layers))
    model = build_skeleton(config, is_encoder(config.model_type), trust_remote_code, dtype, set(md.source.keys()))
    keymap = KeyMap(model, md.source)
    absent, unexpected = check_tensors(model, md.source, keymap, arch.optional if arch else ())
    notes = []
    if unexpected:
        notes.append(
            f"{len(unexpected)} tensor(s) the {config.model_type} model does not use, copied unchanged:"
            f" {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    if absent:  # optional parts (an encoder's pooler): not written, zero for the forward, which never reads them
        notes.append(f"not in the checkpoint and not written (optional): {', '.join(absent)}")
        for name in absent:
            set_tensor(model, name, torch.zeros(model.get_parameter(name).shape, dtype=dtype))
    return StageModel(model, keymap, notes)


def load_outside_layers(
    sm: StageModel, layers: Layers, md: ModelDir, dtype: torch.dtype, device: str, head: bool = False
) -> None:
    """Read the tensors outside the layers (embeddings, final norm; with ``head``, the LM head too) onto the
    device; buffers too."""
    model = sm.model
    base_path = next(name for name, module in model.named_modules() if module is model.base_model)
    base_prefix = f"{base_path}." if base_path and not head else ""
    layer_prefix = layers.path + "."
    outside = [n for n, p in model.named_parameters() if n.startswith(base_prefix) and not n.startswith(layer_prefix)]
    outside = [n for n in outside if model.get_parameter(n).is_meta]
    ties = {t: s for t, s in tied_sources(model).items() if t not in sm.keymap.to_ckpt}  # not stored: shared
    materialize(model, "", [n for n in outside if n not in ties], md.source, sm.keymap, dtype, torch.device(device))
    for target, source in ties.items():  # a tied LM head is the embedding matrix
        if target in outside and not model.get_parameter(source).is_meta:
            set_tensor(model, target, model.get_parameter(source).detach())
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))


def rest_keys(md: ModelDir, keymap: KeyMap, layers: Layers | None) -> list[tuple[str, str]]:
    """``(input key, output key)`` of every tensor the loop does not write: outside the layers, copied as is;
    a layer's extra tensors (unknown to the model) follow their layer, and go with a removed one."""
    if layers is None:
        return [(k, k) for k in md.source.keys()]
    consumed = {k for n, k in keymap.to_ckpt.items() if n.startswith(layers.path + ".")}
    add, strip = keymap._prefix_rule()
    ckpt_layers = add + (layers.path + ".").removeprefix(strip)
    new_index = {src: i for i, src in enumerate(layers.source_index)}
    pattern = re.compile(re.escape(ckpt_layers) + r"(\d+)\.(.*)")
    rest = []
    for key in md.source.keys():
        if key in consumed:
            continue
        match = pattern.fullmatch(key)
        if match is None:
            rest.append((key, key))
        elif int(match[1]) in new_index:
            rest.append((key, f"{ckpt_layers}{new_index[int(match[1])]}.{match[2]}"))
    return rest
