"""Sparse MoE blocks as sparsify writes them: one Linear per expert, named as the family's published checkpoints.

:class:`MoEBlock` computes what transformers' Mixtral / Qwen2-MoE / Qwen3-MoE block computes (softmax router
in float32, top-k, renormalised; Qwen2-MoE's sigmoid-gated shared expert) with its experts as separate
Linears, so that the layer-wise loop can run it, a later pass (quantization) can reach every expert's
projections, and the writer saves it in the published layout. :func:`per_expert_blocks` puts such blocks
into a model transformers built with fused 3-D experts, when a checkpoint stores its experts one by one
in a form transformers cannot fuse (compressed-tensors quantized experts): ``sparsify.load`` then reads
them as they are.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per target family: its model type and class, the router/expert names of its published checkpoints, and
# the config keys for the expert count, top-k and expert width.
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {
        "architecture": "MixtralForCausalLM",
        "prefix": "block_sparse_moe",
        "names": ("w1", "w3", "w2"),  # gate, up, down
        "experts": "num_local_experts",
        "width": "intermediate_size",
        "shared": False,
    },
    "qwen2_moe": {
        "architecture": "Qwen2MoeForCausalLM",
        "prefix": None,
        "names": ("gate_proj", "up_proj", "down_proj"),
        "experts": "num_experts",
        "width": "moe_intermediate_size",
        "shared": True,
    },
    "qwen3_moe": {
        "architecture": "Qwen3MoeForCausalLM",
        "prefix": None,
        "names": ("gate_proj", "up_proj", "down_proj"),
        "experts": "num_experts",
        "width": "moe_intermediate_size",
        "shared": False,
    },
}


@contextlib.contextmanager
def zero_width_quiet() -> Iterator[None]:
    """Build models without torch's warning that initializing a zero-element tensor is a no-op: a Qwen2-MoE
    written without shared experts has a zero-width shared expert (the family always has one), on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
        yield


class Expert(nn.Module):
    """One expert: ``down(act(gate x) * up x)`` under the target family's names."""

    def __init__(self, names: tuple[str, str, str], d: int, width: int, act, dtype, device):
        super().__init__()
        self.names = names
        with zero_width_quiet():
            for name, shape in zip(names, ((width, d), (width, d), (d, width)), strict=True):
                setattr(self, name, nn.Linear(shape[1], shape[0], bias=False, dtype=dtype, device="meta"))
        self.to_empty(device=device)  # no random init: the weights are set from the dense FFN or the checkpoint
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class MoEBlock(nn.Module):
    """The target family's sparse MoE block, computed as transformers computes it (softmax router, top-k,
    renormalised, plus a sigmoid-gated shared expert for Qwen2-MoE); parameters named as its checkpoints name
    them. ``checkpoint_prefix`` replaces the block's own path in the layer when the layer is written."""

    def __init__(self, family: str, d: int, width: int, routed: int, top_k: int, shared_width: int | None, act,
                 dtype, device):  # fmt: skip
        super().__init__()
        spec = FAMILIES[family]
        self.family, self.top_k = family, top_k
        self.checkpoint_prefix = spec["prefix"]
        self.gate = nn.Linear(d, routed, bias=False, dtype=dtype, device=device)
        self.experts = nn.ModuleList(Expert(spec["names"], d, width, act, dtype, device) for _ in range(routed))
        if shared_width is not None:
            self.shared_expert = Expert(spec["names"], d, shared_width, act, dtype, device)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False, dtype=dtype, device=device)

    def route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, experts)``, each ``(tokens, k)``: softmax in float32, top-k, renormalised."""
        probs = torch.softmax(F.linear(h, self.gate.weight).float(), dim=-1)  # (N, E)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), index

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, d)
        weights, index = self.route(h)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                y = expert(h[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.reshape(shape)


def per_expert_blocks(model: nn.Module, config: Any) -> int:
    """Replace (on the meta device) every sparse MoE block of a Mixtral / Qwen2-MoE / Qwen3-MoE ``model`` with a
    :class:`MoEBlock` of the same shapes; returns how many were replaced."""
    from sparsify.arch import SPARSIFY_TYPE_PREFIX

    family = str(getattr(config, "model_type", "")).removeprefix(SPARSIFY_TYPE_PREFIX)
    spec = FAMILIES.get(family)
    if spec is None:
        return 0
    from transformers.activations import ACT2FN

    d, width = int(config.hidden_size), int(getattr(config, spec["width"]))
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) if spec["shared"] else None
    count = 0
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("SparseMoeBlock"):
            continue
        block = MoEBlock(family, d, width, int(getattr(config, spec["experts"])), int(config.num_experts_per_tok),
                         shared, ACT2FN[config.hidden_act], torch.float32, "meta")  # fmt: skip
        block.checkpoint_prefix = None  # the model's own name: transformers' renaming maps the checkpoint's onto it
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, block)
        count += 1
    return count
