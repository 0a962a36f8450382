"""Dense → MoE: carve each FFN into routed (and shared) experts with a router, written as a native MoE checkpoint.

```yaml
- type: moe
  experts: 8             # E: groups of intermediate_size / E neurons each
  top_k: 6               # routed experts per token (6 of 8: 75% of the FFN active)
  shared: 0              # of the E groups, how many are always on (CMoE's shared experts)
  split: coactivation    # coactivation | cluster | random (cluster: weights only, no data)
  router: analytic       # analytic | centroid | trained (centroid: weights only, no data)
```

Papers: MoEfication (Zhang et al. 2022, arXiv:2110.01786), CMoE (Pei et al. 2025, arXiv:2502.04416).
The maths is in :mod:`sparsify.algorithms.moe`; this module turns it into native MoE blocks:

- Llama / Mistral → **Mixtral** (no shared experts) or **Qwen2-MoE** (with shared experts); Qwen2 →
  Qwen2-MoE; Qwen3 → **Qwen3-MoE** (no shared experts: Qwen3-MoE has none). Tensors are written in the
  layout those families' published checkpoints use (``block_sparse_moe.experts.{e}.w1`` for Mixtral,
  ``mlp.experts.{e}.gate_proj`` for Qwen), which transformers 5 fuses on load and vLLM reads.
- **The encoding.** The dense FFN is the plain sum of its neuron groups; these families weight each
  selected expert by its router softmax (renormalised over the top-k: ``norm_topk_prob``). So every routed
  expert's down projection is multiplied by ``k`` and the router by a power of two that makes its softmax
  over the selected experts flat (each weight ``1/k`` to within 0.1%, the ranking kept exactly): a
  selected expert contributes exactly what its neurons contributed to the dense FFN. With ``k`` equal to the
  number of routed experts the router is zero (uniform weights): the model *is* the dense model. Qwen2-MoE's
  shared expert is gated by ``sigmoid(shared_expert_gate(x))``: the gate is zero (sigmoid 0.5) and the
  shared expert's down projection doubled.
- Every field of the dense config is carried over (RoPE base and scaling, head_dim, norms' epsilon, ...),
  checked against what the target family's config makes of it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.algorithms.moe import (
    analytic_router,
    centroid_router,
    check_partition,
    cluster_partition,
    coactivation_partition,
    flat_router_scale,
    partition,
    random_partition,
    shared_neurons,
    topk_recall,
    train_router,
)
from sparsify.arch import layer_windows, lookup
from sparsify.errors import SparsifyError
from sparsify.modules import add_to_bias
from sparsify.passes.base import Pass, register
from sparsify.passes.moe_config import MoEConfig
from sparsify.runtime.format import CONFIG_KEY, patterns_from_config, unwrap_config, wrap_config
from sparsify.runtime.moe import FAMILIES, Expert, MoEBlock

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerWork

# transformers 5 runs fused experts with torch's grouped_mm by default, whose kernel needs every matrix's row stride
# to be a multiple of 16 bytes ("strides should be multiple of 16 bytes"): expert width and hidden size multiples of
# 8 elements in bfloat16/float16 (4 in float32). Otherwise the config names the eager experts (honoured from
# config.json); the expert count does not matter.
GROUPED_MM_ALIGN = 8
FLATNESS = 1e-3  # how far from 1/k a selected expert's routing weight may be (k < E)
SAMPLE_TOKENS = 8192  # calibration tokens kept per layer for the trained router and the recall measure


@register("moe")
class MoEPass(Pass):
    """Converts every layer's FFN into a native MoE block (see the module docstring)."""

    config_cls = MoEConfig
    config: MoEConfig
    kind = "moe"
    reshapes = True
    uses_targets: ClassVar[bool] = False  # the FFN of every layer, from the architecture table
    requires = frozenset({"float", "dense_ffn"})
    removes = frozenset({"dense_ffn"})
    title = "MoE conversion, per layer"
    columns = (
        ("name", "layer", "text"),
        ("experts", "experts", "text"),
        ("split", "split", "text"),
        ("router", "router", "text"),
        ("recall", "router top-k recall", "pct"),
        ("coverage", "activation mass routed", "pct"),
        ("rel_error", "layer output error", "err"),
        ("seconds", "time", "s"),
    )

    def __init__(self, config: MoEConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        c = config
        self.needs_data = c.split == "coactivation" or c.router != "centroid" or c.shared > 0
        self.family: str | None = None
        self.width = 0
        self.hidden = 0
        self.dense: dict[str, Any] = {}

    def describe(self) -> str:
        c = self.config
        shared = f" + {c.shared} shared" if c.shared else ""
        return f"moe {c.experts} experts{shared}, top-{c.top_k}, {c.split} split, {c.router} router"

    # ------------------------------------------------------------------------------- planning

    def bind(self, model: nn.Module) -> None:
        c, arch, config = self.config, self.arch, model.config
        if arch is None or arch.moe_families == (None, None):
            family = arch.model_type if arch else config.model_type
            raise SparsifyError(
                f"{family} has no native MoE counterpart sparsify can write (Llama and Mistral become Mixtral or"
                " Qwen2-MoE, Qwen2 Qwen2-MoE, Qwen3 Qwen3-MoE)"
            )
        target = arch.moe_families[1 if c.shared else 0]
        if target is None:
            raise SparsifyError(f"{arch.model_type} converts to {arch.moe_families[0]}, which has no shared experts")
        if len(arch.mlp_in) != 2 or arch.gate_up_layout != "separate":
            raise SparsifyError(f"{arch.model_type}: moe needs a gated FFN with separate gate and up projections")
        if getattr(config, "mlp_bias", False):
            raise SparsifyError(f"{target} experts have no biases; this model's MLP has (mlp_bias)")
        if getattr(config, "attention_bias", False) and target != "qwen3_moe":
            raise SparsifyError(f"{target} attention has no output bias; this model's has (attention_bias)")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        if target == "qwen2_moe" and head_dim * heads != config.hidden_size:
            raise SparsifyError(
                f"qwen2_moe (in vLLM) takes head_dim = hidden_size / heads; this model's head_dim is {head_dim}"
            )
        width = int(config.intermediate_size)
        if width % c.experts:
            divisors = [e for e in range(2, 65) if width % e == 0]
            raise SparsifyError(
                f"experts {c.experts} does not divide intermediate_size {width}; try one of"
                f" {', '.join(map(str, divisors[:12]))}"
            )
        self.family, self.width, self.hidden = target, width, int(config.hidden_size)

    # ------------------------------------------------------------------------------- per layer

    def targets_in(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        assert self.arch is not None
        a = self.arch
        return {f"{prefix}.{a.mlp}.{n}": layer.get_submodule(f"{a.mlp}.{n}") for n in (*a.mlp_in, a.mlp_out)}

    @torch.no_grad()
    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        assert self.arch is not None and self.family is not None
        t0 = time.perf_counter()
        c, a = self.config, self.arch
        mlp = work.layer.get_submodule(a.mlp)
        W_g, W_u = (mlp.get_submodule(n).weight for n in a.mlp_in)  # (I, d) each
        W_d = mlp.get_submodule(a.mlp_out).weight  # (d, I)
        n, d = W_g.shape  # n: the FFN's intermediate neurons
        width = n // c.experts
        stats = self._statistics(work, mlp) if self.needs_data or work.inputs else None
        shared_idx = (
            shared_neurons(stats["counts"], c.shared * width)
            if c.shared and stats is not None
            else torch.empty(0, dtype=torch.long)
        )
        rest = _complement(shared_idx.long(), n)  # (n - shared,) neurons left for the routed experts
        routed = c.experts - c.shared
        labels = self._split(rest, W_g, W_u, stats, routed)
        groups = [rest[g] for g in partition(labels, routed)]  # original neuron indices per routed expert
        check_partition([*groups, shared_idx.long()] if c.shared else groups, n)
        R, recall, coverage = self._router(groups, W_g, stats)
        # a family whose block always has a shared expert (Qwen2-MoE) gets one of width 0 when none is asked for
        shared_width = c.shared * width if FAMILIES[self.family]["shared"] else None
        block = MoEBlock(self.family, d, width, routed, c.top_k, shared_width, mlp.act_fn, W_g.dtype, W_g.device)
        if c.top_k == routed:
            block.gate.weight.zero_()  # every expert selected: uniform weights, exactly the dense sum
        else:
            block.gate.weight.copy_(R * self._flat_scale(R, stats, work))
        for expert, idx in zip(block.experts, groups, strict=True):
            _fill(expert, W_g[idx], W_u[idx], W_d[:, idx] * c.top_k)  # renormalised weights are 1/k each
        if shared_width is not None:
            _fill(block.shared_expert, W_g[shared_idx], W_u[shared_idx], W_d[:, shared_idx] * 2)  # sigmoid(0) = 1/2
            block.shared_expert_gate.weight.zero_()
        parent, _, attr = a.mlp.rpartition(".")
        setattr(work.layer.get_submodule(parent) if parent else work.layer, attr, block)
        if self.family == "qwen2_moe":  # its q/k/v always carry biases in vLLM: zero ones, exact
            for name in a.attn_in:
                add_to_bias(work.layer.get_submodule(f"{a.attention}.{name}"))
        return [
            {
                "kind": self.kind,
                "name": work.prefix,
                "layer": work.index,
                "pass": self.index,
                "experts": f"{routed} × {width}"
                + (f" + shared {c.shared * width}" if c.shared else "")
                + f", top-{c.top_k}",
                "split": c.split,
                "router": c.router,
                "recall": recall,
                "coverage": coverage,
                "ffn_active": (c.top_k + c.shared) / c.experts,
                "seconds": time.perf_counter() - t0,
                "status": "converted",
            }
        ]

    def _statistics(self, work: LayerWork, mlp: nn.Module) -> dict[str, Tensor] | None:
        """What the split and router need, from one pass over the calibration inputs: per-neuron activity
        counts and co-activations, ``X^T X`` and ``X^T |A|``, and a token sample of ``(x, |a|)``."""
        if not work.inputs:
            return None
        a = self.arch
        assert a is not None
        c = self.config
        gate, down = mlp.get_submodule(a.mlp_in[0]), mlp.get_submodule(a.mlp_out)
        n = down.in_features
        m = max(1, round(c.active_fraction * n))
        acc: dict[str, Any] = {"counts": torch.zeros(n), "tokens": 0, "xs": [], "as": []}
        if c.split == "coactivation":
            acc["coact"] = torch.zeros(n, n)
        if c.router == "analytic":
            # float64 across batches: the same sums whatever the order batches (or ranks) are added in
            acc["XtX"] = torch.zeros(gate.in_features, gate.in_features, dtype=torch.float64)
            acc["XtA"] = torch.zeros(gate.in_features, n, dtype=torch.float64)
        seen: dict[str, Tensor] = {}
        gen = torch.Generator().manual_seed(c.seed + work.index)

        def take_x(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            seen["x"] = args[0].reshape(-1, args[0].shape[-1]).float()  # (N, d)

        def take_a(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            x, A = seen.pop("x"), args[0].reshape(-1, args[0].shape[-1]).float().abs()  # (N, d), (N, n)
            B = torch.zeros_like(A)
            B.scatter_(1, torch.topk(A, m, dim=1).indices, 1.0)  # (N, n): the m most active neurons per token
            acc["counts"] += B.sum(0)
            if "coact" in acc:
                acc["coact"].addmm_(B.T, B)
            if "XtX" in acc:
                acc["XtX"] += x.T @ x
                acc["XtA"] += x.T @ A
            share = SAMPLE_TOKENS // max(1, len(work.inputs) * work.world.size)
            keep = torch.randperm(x.shape[0], generator=gen)[:share]
            acc["xs"].append(x[keep])
            acc["as"].append(A[keep])
            acc["tokens"] += x.shape[0]

        handles = [gate.register_forward_hook(take_x), down.register_forward_hook(take_a)]
        try:
            work.run()
        finally:
            for h in handles:
                h.remove()
        acc["X"], acc["A"] = torch.cat(acc.pop("xs")), torch.cat(acc.pop("as"))
        if work.world.active:  # under torchrun: the sums over every rank's windows, the samples side by side
            for key in ("counts", "coact", "XtX", "XtA"):
                if key in acc:
                    work.world.all_reduce_(acc[key])
            acc["tokens"] = int(work.world.all_reduce_(torch.tensor([acc["tokens"]], dtype=torch.float64)).item())
            acc["X"], acc["A"] = work.world.all_gather_cat(acc["X"]), work.world.all_gather_cat(acc["A"])
        for key in ("XtX", "XtA"):
            if key in acc:
                acc[key] = acc[key].float()
        return acc

    def _split(self, rest: Tensor, W_g: Tensor, W_u: Tensor, stats: dict | None, groups: int) -> Tensor:
        c = self.config
        if c.split == "random":
            return random_partition(rest.numel(), groups, c.seed)
        if c.split == "cluster":
            return cluster_partition(torch.cat([W_g[rest], W_u[rest]], dim=1).float(), groups, c.seed)
        assert stats is not None
        coact = stats["coact"][rest][:, rest]
        return coactivation_partition(coact, stats["counts"][rest], groups, c.seed)

    def _router(
        self, groups: list[Tensor], W_g: Tensor, stats: dict | None
    ) -> tuple[Tensor, float | None, float | None]:
        """The router ``(E, d)`` and, with data, its top-k recall and the activation mass its choice routes."""
        c = self.config
        R = centroid_router(W_g.float(), groups)
        if c.router == "analytic":
            assert stats is not None
            R = analytic_router(stats["XtX"], stats["XtA"], groups)
        if stats is None:
            return R, None, None
        X, A = stats["X"], stats["A"]  # (T, d), (T, n)
        M = torch.zeros(A.shape[1], len(groups))
        for e, idx in enumerate(groups):
            M[idx, e] = 1.0
        S = A @ M  # (T, E): each routed expert's activation mass
        if c.router == "trained":
            init = analytic_router(X.T @ X, X.T @ A, groups) if X.shape[0] > X.shape[1] else R
            R = train_router(X, A, groups, init, c.top_k, c.router_steps, seed=c.seed,
                             callback=lambda _step, _loss: interrupts.check())  # fmt: skip
        logits = X @ R.T
        chosen = torch.zeros_like(S, dtype=torch.bool).scatter_(1, torch.topk(logits, c.top_k, dim=1).indices, True)
        coverage = float((S * chosen).sum() / A.sum().clamp_min(1e-30))  # of all neurons' mass, shared included
        return R, topk_recall(logits, S, c.top_k), coverage

    def _flat_scale(self, R: Tensor, stats: dict | None, work: LayerWork) -> float:
        """The power of two that flattens the router's softmax over the selected experts (module docstring)."""
        if stats is not None:
            logits = stats["X"] @ R.T  # (T, E)
            spread = float((logits.amax(1) - logits.amin(1)).max()) * 1.5  # margin for tokens not seen
        else:  # no data: bound |x| by the norm before the FFN (RMSNorm: |x_j| <= |w_j| * sqrt(d))
            assert self.arch is not None
            gate = f"{self.arch.mlp}.{self.arch.mlp_in[0]}"
            norm = work.layer.get_submodule(next(n for n, fed in self.arch.norm_feeds if gate in fed))
            bound = float(norm.weight.float().abs().max()) * R.shape[1] ** 0.5
            spread = 2 * float(R.float().norm(dim=1).max()) * bound
        return flat_router_scale(spread, FLATNESS)

    # ---------------------------------------------------------------------------------- output

    def edit_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The target family's config: every dense field carried over (the attention's too: a native window,
        or sparsify's attention patterns around the new family), the MoE fields set."""
        if isinstance(cfg.get(CONFIG_KEY), dict):  # sparsify attention patterns: kept, around the MoE family
            patterns, causal = patterns_from_config(cfg)
            return wrap_config(
                self._moe_config(unwrap_config(cfg)), patterns, causal, cfg.get("max_position_embeddings")
            )
        return self._moe_config(cfg)

    def _moe_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        from transformers import AutoConfig

        assert self.family is not None
        c, spec = self.config, FAMILIES[self.family]
        dense = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "transformers_version"})
        fields = {k: v for k, v in dense.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        fields.update(model_type=self.family, architectures=[spec["architecture"]])
        width = self.width // c.experts
        fields[spec["experts"]] = c.experts - c.shared
        fields["num_experts_per_tok"] = c.top_k
        fields[spec["width"]] = width
        if self.family == "mixtral":
            fields.update(router_jitter_noise=0.0, output_router_logits=False)
        else:
            fields.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
            fields["intermediate_size"] = self.width  # for dense layers (none here)
        if self.family == "qwen2_moe":
            fields["shared_expert_intermediate_size"] = c.shared * width
            fields["qkv_bias"] = True  # vLLM's Qwen2-MoE attention always has q/k/v biases (zero ones are added)
        new = AutoConfig.for_model(**fields)
        self._carry_windows(dense, fields)
        for key in ("rope_parameters", "head_dim", "hidden_size", "num_key_value_heads", "rms_norm_eps", "hidden_act"):
            if getattr(dense, key, None) is not None and getattr(new, key, None) != getattr(dense, key):
                raise SparsifyError(
                    f"{self.family} cannot carry {key}={getattr(dense, key)!r} of this {dense.model_type} model"
                    f" (it makes {getattr(new, key, None)!r})"
                )
        if layer_windows(new) != layer_windows(dense):
            raise SparsifyError(f"{self.family} cannot carry the attention windows of this {dense.model_type} model")
        out = new.to_dict()
        out.pop("transformers_version", None)
        if not self._grouped_mm_runs():
            out["experts_implementation"] = "eager"
        return out

    def _grouped_mm_runs(self) -> bool:
        """Whether transformers' default grouped_mm experts take this width and hidden size (see GROUPED_MM_ALIGN)."""
        return (self.width // self.config.experts) % GROUPED_MM_ALIGN == 0 and self.hidden % GROUPED_MM_ALIGN == 0

    def _carry_windows(self, dense: Any, fields: dict[str, Any]) -> None:
        """The dense model's attention windows, written the target family's way (its ``window_config``)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        for key in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"):
            fields.pop(key, None)
        windows = layer_windows(dense)
        sizes = {w for w in windows if w}
        if not sizes:
            return
        style = (lookup(self.family) or self.arch).window_config
        if len(sizes) > 1 or (style == "uniform" and not all(windows)) or style not in ("uniform", "qwen"):
            raise SparsifyError(
                f"{self.family} cannot express this {dense.model_type} model's attention windows"
                f" ({', '.join(str(w or 'full') for w in windows)}); convert to MoE first, then set the windows"
            )
        (window,) = sizes
        fields["sliding_window"] = window
        if style == "qwen":
            types = ["sliding_attention" if w else "full_attention" for w in windows]
            fields.update(use_sliding_window=True, layer_types=types, max_window_layers=0)
        elif "use_sliding_window" in CONFIG_MAPPING[self.family]().to_dict():  # Qwen3-MoE reads it too
            fields["use_sliding_window"] = True

    def notes(self) -> list[str]:
        c = self.config
        routed = c.experts - c.shared
        how = (
            "every routed expert is selected, so the router is zero (uniform weights): the model equals the dense one"
            if c.top_k == routed
            else f"routers scaled so the softmax over the {c.top_k} selected experts is flat to {FLATNESS:g}"
        )
        if not self.family:
            return []
        notes = [f"pass {self.index}: written as {self.family}; {how}"]
        if not self._grouped_mm_runs():
            notes.append(
                f"pass {self.index}: experts {self.width // c.experts} wide, hidden size {self.hidden} (not both"
                f" multiples of {GROUPED_MM_ALIGN}): config.json names the eager experts, as transformers' grouped_mm"
                " needs 16-byte row strides"
            )
        return notes

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        done = [r for r in records if r.get("status") == "converted"]
        if not done:
            return []
        active = done[0]["ffn_active"]
        recalls = [r["recall"] for r in done if r.get("recall") is not None]
        rows = [
            ("MoE layers", f"{len(done)}: {done[0]['experts']}", "moe_layers", len(done)),
            ("FFN active", f"{active:.1%} of the FFN's neurons per token (FFN FLOPs fraction)", "ffn_active", active),
        ]
        if recalls:
            mean = sum(recalls) / len(recalls)
            rows.append(("router recall", f"{mean:.1%} of the true top-k experts (calibration)", "router_recall", mean))
        return rows


def _complement(idx: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return keep.nonzero().squeeze(-1)


def _fill(expert: Expert, W_g: Tensor, W_u: Tensor, W_d: Tensor) -> None:
    for name, W in zip(expert.names, (W_g, W_u, W_d), strict=True):
        getattr(expert, name).weight.copy_(W)
