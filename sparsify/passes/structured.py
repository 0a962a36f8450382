"""Structured pruning: whole FFN channels, attention head groups or layers, physically removed.

```yaml
- type: prune
  structured: channels     # channels | heads | layers
  ratio: 0.2               # channels, heads: the fraction removed (uniform over layers)
  metric: flap             # magnitude | wanda | flap;  layers: block-influence | angular
  bias_compensation: true  # FLAP: the removed channels' mean output folded into the output bias
  multiple_of: 8           # channels: kept width rounded to a multiple of this
- type: prune
  structured: layers
  remove: 4
```

Every layer keeps the same width, so the output is the family's own config with smaller sizes
(``intermediate_size``; ``num_attention_heads``/``num_key_value_heads`` with ``head_dim`` kept;
``num_hidden_layers`` with every per-layer list shortened) and a plain ``from_pretrained`` loads it.
Under grouped-query attention, heads go in whole KV groups (a KV head with its query heads), so the
ratio of query to KV heads, RoPE and the q/k norms are unchanged. The maths is in
:mod:`sparsify.algorithms.structured`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsify.algorithms.structured import (
    angular_distance,
    bias_compensation,
    block_influence,
    channel_scores,
    group_scores,
    keep_top,
    kept_width,
    layers_to_remove,
    refit_output,
)
from sparsify.arch import find_layers
from sparsify.errors import SparsifyError
from sparsify.modules import add_to_bias, keep_inputs, keep_outputs, out_features, set_weight_matrix, weight_matrix
from sparsify.passes.base import Pass, register_variant, shorten_per_layer

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork
    from sparsify.passes.prune_config import PruneConfig

METRIC_WINDOWS = 16  # calibration windows the layer metrics compare (hidden states held per layer)
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads")  # attention-module attributes that count query heads
KV_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@register_variant("prune", when=lambda config: config.structured is not None)
class StructuredPrunePass(Pass):
    """Removes FFN channels, head groups or layers (see the module docstring)."""

    config: PruneConfig
    kind = "structured"
    reshapes = True
    uses_targets = False  # the blocks of every layer, from the architecture table
    title = "Structured pruning, per layer"
    columns = (
        ("name", "layer", "text"),
        ("what", "removed", "text"),
        ("kept", "kept", "text"),
        ("metric", "metric", "text"),
        ("rel_error", "layer output error", "err"),
        ("seconds", "time", "s"),
    )

    def __init__(self, config: PruneConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        if arch is None:
            raise SparsifyError(
                f"pass {index}: structured pruning needs a family in the architecture table (it edits the config)"
            )
        c = config
        self.what = c.structured
        self.metric = c.structured_metric
        needs: set[str] = set()
        if self.what != "layers" and self.metric in ("wanda", "flap"):
            needs.add("sq_norm")
        if self.what != "layers" and (self.metric == "flap" or c.bias_compensation):
            needs |= {"sq_norm", "sum"}
        if self.what != "layers" and c.refit:
            needs.add("hessian")
        self.needs = frozenset(needs)
        self.needs_data = self.what == "layers" or bool(needs)
        self.requires = frozenset({"float", "dense_ffn"} if self.what == "channels" else {"float"})
        self.removed_layers: list[int] = []
        self.layer_scores: list[float] = []
        self.sizes: dict[str, int] = {}  # what edit_config writes (new widths)
        self._bias_flag: str | None = None
        self._n_layers = 0

    # ------------------------------------------------------------------------------- planning

    def describe(self) -> str:
        c = self.config
        amount = f"{c.remove} layers" if self.what == "layers" else f"{c.ratio:.0%} of {self.what}"
        bias = (" + bias compensation" if c.bias_compensation else "") + (" + refit" if c.refit else "")
        return f"prune structured {amount} by {self.metric}{bias}"

    def bind(self, model: nn.Module) -> None:
        """Read the sizes this pass changes from the model built from the config; refuse what cannot be expressed."""
        assert self.arch is not None
        c, keys, config = self.config, self.arch.keys, model.config
        family = self.arch.model_type
        self._n_layers = int(config.num_hidden_layers)
        if self.what == "channels":
            first = find_layers(model, self.arch)[1][0]
            width = out_features(first.get_submodule(_join(self.arch.mlp, self.arch.mlp_in[0])))
            width //= 2 if self.arch.gate_up_layout == "concat" else 1
            self.sizes = {"ffn_from": width, "ffn": kept_width(width, float(c.ratio or 0.0), c.multiple_of)}
        if self.what == "layers":
            if c.remove is not None and c.remove >= self._n_layers:
                raise SparsifyError(f"pass {self.index}: removing {c.remove} of {self._n_layers} layers leaves none")
            return
        side = "mlp" if self.what == "channels" else "attn"
        flag = keys.mlp_bias if side == "mlp" else keys.attn_bias
        if c.bias_compensation and flag is None:
            what = self.arch.mlp_out if side == "mlp" else self.arch.attn_out
            raise SparsifyError(
                f"bias compensation needs a bias on {what}; {family} has none and no config field to add one"
            )
        self._bias_flag = flag if c.bias_compensation and flag != "native" else None
        if self.what == "heads":
            if keys.head_dim is None:
                raise SparsifyError(
                    f"{family} derives head_dim from hidden_size / {keys.heads}: a config with fewer heads would"
                    " change every head's size, so structured heads cannot be written for it natively"
                )
            heads = int(config.num_attention_heads)
            kv = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
            keep = kv - round(kv * c.ratio)
            if keep < 1:
                raise SparsifyError(
                    f"ratio {c.ratio} removes all {kv} head groups of {family} (KV groups of {heads // kv} query"
                    f" heads); at most {(kv - 1) / kv:.3f} keeps one"
                )
            self.sizes = {"heads": heads, "kv": kv, "head_dim": head_dim, "keep_groups": keep}

    def targets_in(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        """The block this pass reshapes in a layer: MLP projections (channels) or attention ones (heads)."""
        assert self.arch is not None
        a = self.arch
        if self.what == "layers":
            return {}
        block, names = (
            (a.mlp, (*a.mlp_in, a.mlp_out)) if self.what == "channels" else (a.attention, (*a.attn_in, a.attn_out))
        )
        return {_join(prefix, block, n): layer.get_submodule(_join(block, n)) for n in names}

    def stat_targets(self, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        out = self._out_name()
        return {fqn: m for fqn, m in targets.items() if fqn.endswith("." + out)}

    def _out_name(self) -> str:
        assert self.arch is not None
        a = self.arch
        return _join(a.mlp, a.mlp_out) if self.what == "channels" else _join(a.attention, a.attn_out)

    # ------------------------------------------------------------------------------- layers

    def prepare(self, runner: LayerwiseRunner) -> None:
        if self.what != "layers":
            return
        n = int(self.config.remove or 0)
        held: dict[int, Tensor] = {}  # layer -> its input hidden states (angular: until layer + n - 1 is done)
        world, first = runner.world, runner.first_window()
        # the first METRIC_WINDOWS windows of the calibration; under torchrun, those this rank holds
        mine = max(0, METRIC_WINDOWS - first)

        def flat(hs: list[Tensor]) -> Tensor:
            return torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])[: mine * hs[0].shape[1]]  # (tokens, hidden)

        def mean(values: Tensor) -> Tensor:  # over every rank's tokens (one process: torch.mean)
            if not world.active:
                return values.mean()
            total = torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64)])
            world.all_reduce_(total)
            return total[0] / total[1]

        def score(work: LayerWork, outputs: list[Tensor]) -> float | None:
            h_in, h_out = flat(work.inputs), flat(outputs)
            if self.metric == "block-influence":
                return block_influence(h_in, h_out, mean)
            held[work.index] = h_in
            start = work.index - n + 1
            return angular_distance(held.pop(start), h_out, mean) if start >= 0 else None

        scores = runner.observe(score, f"layer importance ({self.metric})")
        self.layer_scores = [s for s in scores if s is not None]
        self.removed_layers = layers_to_remove(self.metric, self.layer_scores, n)

    def layers_to_remove(self) -> list[int]:
        return self.removed_layers

    def decisions(self) -> dict[str, Any]:
        return {"removed_layers": self.removed_layers, "layer_scores": self.layer_scores} if self.removed_layers else {}

    def restore(self, decisions: dict[str, Any]) -> None:
        self.removed_layers = [int(i) for i in decisions.get("removed_layers", [])]
        self.layer_scores = [float(x) for x in decisions.get("layer_scores", [])]

    # ------------------------------------------------------------------------------- per layer

    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        import time

        t0 = time.perf_counter()
        record = self._channels(work) if self.what == "channels" else self._heads(work)
        record.update(kind=self.kind, name=work.prefix, layer=work.index, metric=self.metric)
        record["pass"] = self.index
        record["seconds"] = time.perf_counter() - t0
        return [record]

    def _module(self, work: LayerWork, block: str, name: str) -> nn.Module:
        return work.layer.get_submodule(_join(block, name))

    def _channels(self, work: LayerWork) -> dict[str, Any]:
        assert self.arch is not None
        a = self.arch
        ins = [self._module(work, a.mlp, n) for n in a.mlp_in]
        out = self._module(work, a.mlp, a.mlp_out)
        concat = a.gate_up_layout == "concat"
        width = out_features(ins[0]) // (2 if concat else 1)
        W_in = [weight_matrix(m) for m in ins]
        if concat:  # [gate; up] rows
            W_in = [W_in[0][:width], W_in[0][width:]]
        stats = work.stats.get(_join(work.prefix, self._out_name()))
        sq_mean = stats.mean("sq_norm") if stats is not None and "sq_norm" in stats else None
        mean = stats.mean("sum") if stats is not None and "sum" in stats else None
        if width != self.sizes["ffn_from"]:
            raise SparsifyError(f"{work.prefix}: FFN width {width}, but the plan saw {self.sizes['ffn_from']}")
        keep = self.sizes["ffn"]
        kept = keep_top(channel_scores(self.metric, W_in, weight_matrix(out), sq_mean, mean), keep)  # (keep,)
        removed = _complement(kept, width)
        W_new, delta = self._output_update(weight_matrix(out), stats, kept, removed, mean)
        rows = torch.cat([kept, kept + width]) if concat else kept
        for m in ins:
            keep_outputs(m, rows)
        keep_inputs(out, kept)
        if W_new is not None:
            set_weight_matrix(out, W_new)
        self._add_biases(work, a.mlp, (*a.mlp_in, a.mlp_out), out, delta)
        return {"what": f"{width - keep} of {width} channels", "kept": f"{keep} channels", "status": "pruned"}

    def _heads(self, work: LayerWork) -> dict[str, Any]:
        assert self.arch is not None
        a, s = self.arch, self.sizes
        heads, kv, hd, keep = s["heads"], s["kv"], s["head_dim"], s["keep_groups"]
        per_group = heads // kv
        attn = work.layer.get_submodule(a.attention) if a.attention else work.layer
        projections = [self._module(work, a.attention, n) for n in a.attn_in]
        out = self._module(work, a.attention, a.attn_out)
        W_o = weight_matrix(out)  # (hidden, heads * hd)
        stats = work.stats.get(_join(work.prefix, self._out_name()))
        sq_mean = stats.mean("sq_norm") if stats is not None and "sq_norm" in stats else None
        mean = stats.mean("sum") if stats is not None and "sum" in stats else None
        if self.metric == "magnitude":
            scores = group_scores(W_o.float().pow(2).sum(0), per_group * hd)
            rows = _qkv_rows(projections, a.qkv_layout, heads, kv, hd)
            scores = scores + group_scores(rows["q"], per_group * hd) + group_scores(rows["k"] + rows["v"], hd)
        else:
            scores = group_scores(channel_scores(self.metric, [], W_o, sq_mean, mean), per_group * hd)
        kept_groups = keep_top(scores, keep)  # (keep,)
        q_idx = torch.cat([torch.arange(g * per_group * hd, (g + 1) * per_group * hd) for g in kept_groups.tolist()])
        kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept_groups.tolist()])
        removed = _complement(q_idx, heads * hd)
        W_new, delta = self._output_update(W_o, stats, q_idx, removed, mean)
        if a.qkv_layout == "concat":
            (qkv,) = projections
            keep_outputs(qkv, torch.cat([q_idx, heads * hd + kv_idx, heads * hd + kv * hd + kv_idx]))
        else:
            q, k, v = projections
            keep_outputs(q, q_idx)
            keep_outputs(k, kv_idx)
            keep_outputs(v, kv_idx)
        keep_inputs(out, q_idx)
        if W_new is not None:
            set_weight_matrix(out, W_new)
        _set_head_counts(attn, keep * per_group, keep if kv != heads else keep * per_group, a.keys)
        self._add_biases(work, a.attention, (*a.attn_in, a.attn_out), out, delta)
        return {
            "what": f"{kv - keep} of {kv} head groups ({(kv - keep) * per_group} query heads)",
            "kept": f"{keep * per_group} heads / {keep} KV",
            "status": "pruned",
        }

    def _output_update(
        self, W_out: Tensor, stats: Any, kept: Tensor, removed: Tensor, mean: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(new output weight over the kept inputs or None, bias delta or None)``: the refit (least squares
        on the calibration inputs, the bias fitted with it when compensating) or FLAP's bias compensation."""
        c = self.config
        if c.refit:
            H = stats.mean("hessian")  # (n, n) = E[x x^T] of the output projection's inputs
            try:
                return refit_output(W_out.float(), H, kept, mean if c.bias_compensation else None)
            except ValueError as e:
                raise SparsifyError(f"pass {self.index}: {e}") from e
        if c.bias_compensation and mean is not None:
            return None, bias_compensation(W_out, mean, removed)
        return None, None

    def _add_biases(
        self, work: LayerWork, block: str, names: tuple[str, ...], out: nn.Module, delta: Tensor | None
    ) -> None:
        """Bias compensation: a config flag that gives the block's Linears biases adds zero ones first."""
        if self._bias_flag is not None:
            for n in names:
                add_to_bias(self._module(work, block, n))
        if delta is not None:
            add_to_bias(out, delta)

    # ------------------------------------------------------------------------------- output

    def edit_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        assert self.arch is not None
        keys, new = self.arch.keys, dict(cfg)
        if self.what == "layers":
            if not self.removed_layers:
                raise RuntimeError(f"pass {self.index}: the layers to remove were never decided")
            return self._without_layers(new, self.removed_layers)
        if self._bias_flag is not None:
            new[self._bias_flag] = True
        if self.what == "channels" and "ffn" in self.sizes:
            new[keys.ffn] = self.sizes["ffn"]
        if self.what == "heads":
            s = self.sizes
            per_group = s["heads"] // s["kv"]
            new[keys.heads] = s["keep_groups"] * per_group
            if keys.kv_heads is not None:
                new[keys.kv_heads] = s["keep_groups"] if s["kv"] != s["heads"] else s["keep_groups"] * per_group
            if keys.head_dim is not None:
                new[keys.head_dim] = s["head_dim"]  # explicit: it may have been hidden_size / heads before
        return new

    def plan_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Which layers go is decided by the calibration data; how many is known: the last ones stand in."""
        if self.what == "layers" and not self.removed_layers:
            n, r = self._n_layers, int(self.config.remove or 0)
            return self._without_layers(dict(cfg), list(range(n - r, n)))
        return self.edit_config(cfg)

    def _without_layers(self, cfg: dict[str, Any], removed: list[int]) -> dict[str, Any]:
        assert self.arch is not None
        keep = [i for i in range(self._n_layers) if i not in set(removed)]
        new = shorten_per_layer(cfg, keep, self._n_layers)
        new[self.arch.keys.layers] = len(keep)
        return new

    def notes(self) -> list[str]:
        c = self.config
        if self.what == "layers" and self.removed_layers:
            scores = ", ".join(f"{x:.4f}" for x in self.layer_scores)
            return [f"pass {self.index}: removed layers {self.removed_layers} by {self.metric} (scores {scores})"]
        if self.what == "channels" and "ffn" in self.sizes:
            width, keep = self.sizes["ffn_from"], self.sizes["ffn"]
            return [
                f"pass {self.index}: FFN width {width} -> {keep} ({(width - keep) / width:.1%} removed; ratio"
                f" {c.ratio} rounded to a multiple of {c.multiple_of})"
            ]
        if self.what == "heads" and self.sizes:
            s = self.sizes
            removed = s["kv"] - s["keep_groups"]
            return [
                f"pass {self.index}: {removed} of {s['kv']} head groups removed ({removed / s['kv']:.1%}; ratio"
                f" {c.ratio} rounded to whole KV groups)"
            ]
        return []

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        if not records:
            return []
        return [("structured", f"{len(records)} layers: {records[-1]['what']} each", "structured_layers", len(records))]


def _complement(kept: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().squeeze(-1)


def _qkv_rows(projections: list[nn.Module], layout: str, heads: int, kv: int, hd: int) -> dict[str, Tensor]:
    """Squared row norms of q, k and v, ``(heads * hd,)``, ``(kv * hd,)``, ``(kv * hd,)``."""
    if layout == "concat":
        rows = weight_matrix(projections[0]).float().pow(2).sum(1)
        q, k, v = rows.split([heads * hd, kv * hd, kv * hd])
        return {"q": q, "k": k, "v": v}
    q, k, v = (weight_matrix(m).float().pow(2).sum(1) for m in projections)
    return {"q": q, "k": k, "v": v}


def _set_head_counts(attn: nn.Module, heads: int, kv: int, keys: Any) -> None:
    """The attention module's own head counts (and its config, where its forward reads that) after removal."""
    for name in HEAD_ATTRIBUTES:
        if hasattr(attn, name):
            setattr(attn, name, heads)
    for name in KV_ATTRIBUTES:
        if hasattr(attn, name):
            setattr(attn, name, kv)
    if getattr(attn, "config", None) is not None:
        attn.config = copy.copy(attn.config)  # this layer's view only: the others keep theirs until pruned
        attn.config.num_attention_heads = heads
        if keys.kv_heads is not None:
            attn.config.num_key_value_heads = kv
