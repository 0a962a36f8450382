"""Quantization: W8A8 (dynamic or static activations, optionally SmoothQuant), weight-only int4/int8
(RTN or GPTQ, per channel or per group), and quantization-aware tuning, written in the compressed-tensors
format that transformers and vLLM load.

```yaml
- type: quantize
  scheme: w4a16            # w8a8 | w8a8-static | w4a16 | w8a16
  method: gptq             # rtn | gptq
  group_size: 32           # w4a16 default: 128 where it divides every target's inputs, else 32 (GGUF's
                           #   block: exports as stored); -1 per channel (w8a16's default)
  act_order: true          # GPTQ (default): columns in decreasing Hessian-diagonal order (static groups)
  symmetric: true          # false: asymmetric weights (weight-only schemes)
  observer: mse            # w8a8-static: mse | percentile | minmax (the input_scale)
  smoothquant: 0.5         # W8A8: migrate activation outliers into the weights (alpha)
  qat: {steps: 200, lr: 1.0e-4}   # then tune each layer with fake quantization (straight-through)
```

Papers: GPTQ (Frantar et al. 2022, arXiv:2210.17323), SmoothQuant (Xiao et al. 2023,
arXiv:2211.10438), LSQ (Esser et al. 2020, arXiv:1902.08153) for the learned step sizes of QAT.

Per layer, in this order: SmoothQuant folds ``1/s`` into each norm and ``s`` into the Linears it feeds
(the float layer computes the same function; the statistics are rescaled to match); each target's
weights are quantized (RTN from the observer's range, or GPTQ with the layer's Hessian; weights that are
exactly zero, e.g. after 2:4 pruning, stay zero); static activation scales come from the observer over
the (smoothed) calibration inputs; with ``qat`` the layer's quantized weights and scales are then tuned
so that the layer reproduces the float layer's outputs on the calibration inputs (layer-wise,
``steps`` Adam steps, straight-through rounding). Each target becomes a
:class:`~sparsify.runtime.quantized.QuantizedLinear` holding the checkpoint's tensors.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.algorithms.quant import (
    QuantArgs,
    dequantize,
    fake_quantize,
    observe,
    qparams,
    quantize,
)
from sparsify.algorithms.reconstruct import fit_block
from sparsify.arch import is_encoder
from sparsify.errors import SparsifyError
from sparsify.modules import replace_module
from sparsify.passes import equalizers
from sparsify.passes import quantize_budget as budget
from sparsify.passes.base import Pass, calibration_record, register, saw_no_tokens
from sparsify.passes.equalizers import EQUALIZERS
from sparsify.passes.quantize_config import DEFAULT_GROUP, GGUF_BLOCK, QuantizeConfig
from sparsify.passes.quantize_methods import QUANTIZE_METHODS, SCHEMES, QuantizeMethod, expand_zero_point
from sparsify.passes.trainable import FakeQuantLinear, rows_of
from sparsify.runtime.quantized import STATIC_ACT_ARGS, QuantizedLinear, QuantScheme
from sparsify.sizes import fmt_bytes

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork

log = logging.getLogger(__name__)


@register("quantize")
class QuantizePass(Pass):
    """Quantizes the target Linears (see the module docstring)."""

    config_cls = QuantizeConfig
    config: QuantizeConfig
    kind = "quantize"
    title = "Quantization, per Linear"
    removes = frozenset({"float"})  # its modules are not float Linears any more
    columns = (
        ("name", "Linear", "text"),
        ("shape", "shape", "shape"),
        ("scheme", "scheme", "text"),
        ("group_size", "group", "text"),
        ("method", "method", "text"),
        ("weight_error", "weight error", "err"),
        ("rel_error", "output error", "err"),
        ("qat_loss", "QAT loss (before → after)", "text"),
        ("seconds", "time", "s"),
    )

    def __init__(self, config: QuantizeConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        c = config
        self.method = QUANTIZE_METHODS[c.method]
        static = c.activations == "static"
        needs = set(self.method.needs)
        if c.weight_observer == "weighted-mse":
            needs.add("hessian")  # its diagonal: each input's mean square
        # the equalizer the config turns on (its key: smoothquant, awq), if any
        self.equalizer = next((e for n, e in EQUALIZERS.items() if getattr(c, n, None) is not None), None)
        if static:
            needs.add("abs_max")
        if self.equalizer is not None:
            needs |= self.equalizer.needs
        if (static and c.observer != "minmax") or (self.equalizer is not None and self.equalizer.samples):
            needs.add("sample")  # rows of the input: static activation scales, AWQ's search
        self.needs = frozenset(needs)
        self.needs_grad = c.qat is not None
        self.per_target = self.equalizer is None and c.qat is None  # else the layer's Linears are fitted together
        self.needs_data = bool(self.needs) or bool(c.qat) or c.budgeted  # a budget: the Fisher
        self.scheme = c.quant_scheme()
        self.model: nn.Module | None = None
        self.equalized: list[str] = []  # the producers scales were folded into (layer-relative)
        self.skipped_pairs: set[str] = set()  # pairs whose producer's outputs are not the consumers' inputs
        self.awq_found: list[dict[str, Any]] = []  # each AWQ pair's exponent and errors
        self.auto_group_why: str | None = None  # why the default group size is GGUF's block (see validate)
        self.budget: dict[str, Any] | None = None  # a bit budget's choice (see prepare): bits per fqn, bytes, KL

    def scheme_of(self, fqn: str) -> QuantScheme:
        """The scheme target ``fqn`` is quantized with: the config's, or int8 where a bit budget chose it."""
        if self.budget is not None and self.budget["bits"].get(fqn) == budget.INT8:
            return budget.int8_scheme(self.scheme)
        return self.scheme

    def describe(self) -> str:
        c = self.config
        group = f" g{c.weight_group}" if c.weight_group and not c.group_auto else ""
        extra = (
            (f" + SmoothQuant {c.smoothquant}" if c.smoothquant is not None else "")
            + (" + AWQ" if c.awq is not None else "")
            + (f" + QAT {c.qat.steps} steps" if c.qat else "")
        )
        order = " act-order" if c.gptq_act_order else ""
        sym = "" if c.symmetric else " asymmetric"
        asked = f" within {self._asked()} (int4/int8 per Linear)" if c.budgeted else ""
        return f"quantize {c.scheme}{group} {c.method}{order}{sym}{extra}{asked}"

    def _asked(self) -> str:
        c = self.config
        return f"{c.target_bpw:g} bits per weight" if c.target_bpw is not None else f"{c.target_size}"

    # ------------------------------------------------------------------------------- planning

    def bind(self, model: nn.Module) -> None:
        if self.config.budgeted and is_encoder(str(model.config.model_type)):
            flag = "target_bpw" if self.config.target_bpw is not None else "target_size"
            raise SparsifyError(
                f"{flag} weighs each Linear by a language model's loss (a Fisher diagonal);"
                f" {model.config.model_type} is an encoder: give a scheme without a budget"
            )
        eq = self.equalizer
        if eq is not None and (self.arch is None or not self.arch.smoothable or not self.arch.norm_feeds):
            family = self.arch.model_type if self.arch else str(model.config.model_type)
            why = (
                "its norms also feed the residual stream (post-norm)" if self.arch else "its norms are not in the table"
            )
            raise SparsifyError(f"{eq.title} cannot fold scales into {family}'s norms: {why}")
        if eq is not None and getattr(model.config, "do_layer_norm_before", True) is False:
            raise SparsifyError(f"{eq.title} cannot fold scales into a post-norm model's norms (do_layer_norm_before)")
        self.model = model

    def after(self, earlier: list[Pass]) -> None:
        if self.config.budgeted and (shaper := next((p for p in earlier if p.reshapes), None)) is not None:
            raise SparsifyError(
                f"pass {self.index}'s bit budget decides each Linear before the sweep, and pass {shaper.index}"
                f" ({shaper.describe()}) changes the Linears during it: put the budget in a recipe run on that"
                " pass's output"
            )

    def validate(self, targets: dict[int, dict[str, nn.Module]]) -> None:
        widths: dict[str, int] = {}  # fqn -> inputs, every target of every layer
        for layer_targets in targets.values():
            for fqn, module in layer_targets.items():
                if not isinstance(module, nn.Linear):
                    raise SparsifyError(
                        f"{fqn} is a {type(module).__name__}, not an nn.Linear: the compressed-tensors format"
                        " (and vLLM) quantize nn.Linear modules only"
                    )
                widths[fqn] = module.in_features
        c = self.config
        if c.group_auto:
            self._resolve_group(widths)
        else:
            group = c.weight_group
            for fqn, width in widths.items():
                if group and width % group:
                    raise SparsifyError(
                        f"--group-size {group} does not divide {fqn}'s {width} inputs; {_group_hint(widths, c)}"
                    )
        if c.target_bpw is not None:  # sure refusals only: scales in 2 bytes for the least, 4 for the most
            for scale_dtype, side in ((torch.float16, "low"), (torch.float32, "high")):
                options = [
                    budget.target(fqn, i, m.weight.shape, scale_dtype, self._budget_schemes())
                    for i, layer_targets in targets.items()
                    for fqn, m in layer_targets.items()
                ]
                budget.check_reach(options, budget.budget_bytes(c.target_bpw, None, options, 0), 0, c, side)

    def _resolve_group(self, widths: dict[str, int]) -> None:
        """w4a16's default group size for these targets: :data:`DEFAULT_GROUP` where it divides every one's inputs,
        else :data:`GGUF_BLOCK` (noted). The pass's config then holds the number, which the report's settings name;
        the choice is a function of the planned widths alone, so a ``--resume`` or a re-run chooses alike."""
        group = DEFAULT_GROUP
        odd = next(((fqn, w) for fqn, w in widths.items() if w % DEFAULT_GROUP), None)
        if odd is not None:
            group = GGUF_BLOCK
            if (bad := next(((fqn, w) for fqn, w in widths.items() if w % GGUF_BLOCK), None)) is not None:
                raise SparsifyError(
                    f"the default group size ({DEFAULT_GROUP}, else {GGUF_BLOCK}) does not divide {bad[0]}'s"
                    f" {bad[1]} inputs; set --group-size: {_group_hint(widths, self.config)}"
                )
            gguf = self.config.gguf_type()
            stored = f"; {GGUF_BLOCK} exports to GGUF {gguf} as stored" if gguf else ""
            self.auto_group_why = f"{DEFAULT_GROUP} does not divide {odd[0]}'s {odd[1]} inputs{stored}"
        self.config = self.config.model_copy(update={"group_size": group})
        self.scheme = self.config.quant_scheme()

    # ----------------------------------------------------------------------------- a bit budget

    def _budget_schemes(self) -> list[QuantScheme]:
        return [self.scheme, budget.int8_scheme(self.scheme)]

    def prepare(self, runner: LayerwiseRunner) -> None:
        """A bit budget's choice, before the first layer is quantized (see :mod:`.quantize_budget`)."""
        if self.config.budgeted:
            method, options = self._uncalibrated()
            self.budget = budget.plan(
                runner, self.targets_in, self._budget_schemes(), self.config,
                lambda W, args: method.round(W, None, args, W != 0, options).weight,
            )  # fmt: skip
            log.info("bit budget: %s", budget.mix_text(self.budget["bits"]))

    def decisions(self) -> dict[str, Any]:
        return {"budget": self.budget} if self.budget is not None else {}

    def restore(self, decisions: dict[str, Any]) -> None:
        if "budget" in decisions:
            self.budget = decisions["budget"]

    # ------------------------------------------------------------------------------- per layer

    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        c = self.config
        with torch.no_grad():
            teacher = work.run() if c.qat is not None else None  # the float layer's outputs: what QAT reproduces
        factors = self._equalize(work) if self.equalizer is not None else {}
        records, quantized = [], {}
        for fqn, module in work.targets.items():
            t0 = time.perf_counter()
            stats = work.stats.get(fqn)
            s = factors.get(fqn)
            W = module.weight.detach().float()  # (out, in), already smoothed
            H = None
            blind = saw_no_tokens(self.needs, stats)
            if "hessian" in self.needs and not blind:
                H = stats.mean("hessian")  # (in, in)
                if s is not None:
                    H = H / (s[:, None] * s[None, :])  # the smoothed inputs' X^T X
            scheme = self.scheme_of(fqn)
            q, scale, zp, W_q = self._quantize_weight(fqn, W, H, blind, scheme.weights)
            input_scale = self._input_scale(stats, s) if c.activations == "static" and not blind else None
            record: dict[str, Any] = {
                "kind": self.kind,
                "name": fqn,
                "layer": work.index,
                "pass": self.index,
                "shape": list(W.shape),
                "scheme": scheme.name,
                "bits": scheme.weights.bits,
                "group_size": scheme.group_size or "channel",
                "method": c.method + (" + QAT" if c.qat else ""),
                "act_order": c.gptq_act_order,
                "weight_error": _weight_error(W, W_q, H),
                "status": "quantized",
                **calibration_record(stats, self._uncalibrated_text() if blind else None),
            }
            bias = module.bias.detach() if module.bias is not None else None
            quantized[fqn] = (q, scale.float(), zp, bias, input_scale, W)
            record["seconds"] = time.perf_counter() - t0
            records.append(record)
        if c.activations == "static":
            _borrow_input_scales(quantized)
        if c.qat is not None and teacher is not None:
            losses = self._qat(work, quantized, teacher)
            for r in records:
                r["qat_loss"] = losses
        for fqn, (q, scale, zp, bias, input_scale, _) in quantized.items():
            new = QuantizedLinear.from_quantized(q, scale, zp, self.scheme_of(fqn), bias, input_scale)
            replace_module(work.layer, work.relative(fqn), new)
        return records

    def _uncalibrated(self) -> tuple[QuantizeMethod, QuantizeConfig]:
        """How a target that saw no calibration token is rounded: RTN, with the data-free observer nearest the
        configured one (the method and the settings it reads)."""
        options = self.config
        if options.weight_observer == "weighted-mse":
            options = options.model_copy(update={"weight_observer": "mse"})
        return QUANTIZE_METHODS["rtn"], options

    def _uncalibrated_text(self) -> str:
        method, options = self._uncalibrated()
        return f"{method.name}, {options.weight_observer} observer"

    def _quantize_weight(
        self, fqn: str, W: Tensor, H: Tensor | None, blind: bool, args: QuantArgs
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(q, scale, zero_point, dequantized)`` by the config's method (``blind``: no calibration data for
        this target: see :meth:`_uncalibrated`); exact zeros stay zero."""
        mask = W != 0  # (out, in): zeros of an earlier pruning pass stay zeros
        method, options = self._uncalibrated() if blind else (self.method, self.config)
        try:
            r = method.round(W, H, args, mask, options)
        except ValueError as e:
            raise SparsifyError(f"{fqn}: {e}") from e
        return r.q, r.scale, r.zero_point, r.weight

    def _input_scale(self, stats: Any, s: Tensor | None) -> Tensor:
        """The static activation scale (per tensor, symmetric int8) from the observer over the inputs."""
        c = self.config
        if c.observer == "minmax" or "sample" not in stats:
            absmax = stats["abs_max"] if s is None else stats["abs_max"] / s  # (in,)
            amax = absmax.max().reshape(1)
            scale, _ = qparams(-amax, amax, STATIC_ACT_ARGS)
            return scale
        rows = stats["sample"] if s is None else stats["sample"] / s  # (rows, in)
        lo, hi = observe(rows.reshape(1, -1), STATIC_ACT_ARGS, c.observer)
        scale, _ = qparams(lo.reshape(1), hi.reshape(1), STATIC_ACT_ARGS)
        return scale

    # ------------------------------------------------------------------------ equalizers

    def _equalize(self, work: LayerWork) -> dict[str, Tensor]:
        """The equalizer on this layer (SmoothQuant, AWQ: :mod:`.equalizers`), pair by pair in data-flow order:
        fqn → the factors ``s`` its input was divided by (its weight's columns multiplied)."""
        assert self.arch is not None and self.equalizer is not None
        eq, layer, method, options = self.equalizer, work.layer, *self._uncalibrated()
        by_linear: dict[str, Tensor] = {}
        for pair in equalizers.pairs(self.arch, eq.linear_pairs):
            present = [n for n in pair.consumers if f"{work.prefix}.{n}" in work.stats]
            if not present:
                continue  # not targets here (ignored, or a MoE layer's experts)
            if not equalizers.fits(layer, pair):
                self.skipped_pairs.add(f"{pair.producer} -> {', '.join(pair.consumers)}")
                continue
            scheme = self.scheme_of(f"{work.prefix}.{present[0]}")
            args, pair.group = scheme.weights, scheme.group_size
            pair.weights = [layer.get_submodule(n).weight.detach().float() for n in pair.consumers]
            pair.stats = work.stats[f"{work.prefix}.{present[0]}"]  # one input for every consumer
            pair.fake_quantize = lambda W, a=args: method.round(W, None, a, W != 0, options).weight
            s, info = eq.scales(pair, self.config)  # (in,)
            equalizers.fold(layer, pair, s, self.arch.norm_offset)
            self.equalized.append(pair.producer)
            if info:
                self.awq_found.append(info)
            for name in pair.consumers:  # the same function: errors are measured against W * s on x / s
                fqn = f"{work.prefix}.{name}"
                by_linear[fqn] = s
                if fqn in work.reference:
                    work.reference[fqn] = work.reference[fqn] * s
            producer = f"{work.prefix}.{pair.producer}"
            if pair.kind == "linear" and producer in work.reference:  # its rows were divided by s
                work.reference[producer] = work.reference[producer] / s[:, None]
        return by_linear

    # -------------------------------------------------------------------------------- QAT

    def _qat(self, work: LayerWork, quantized: dict[str, tuple], teacher: list[Tensor]) -> str:
        """Tune the layer's quantized weights and scales to reproduce ``teacher`` (straight-through rounding)."""
        qat = self.config.qat
        assert qat is not None
        args = self.scheme.weights
        modules: dict[str, FakeQuantLinear] = {}
        for fqn, (q, scale, zp, bias, input_scale, _W) in quantized.items():
            W0 = dequantize(q, scale, zp, args).float()  # start from the PTQ result: step 0 is the PTQ layer
            modules[fqn] = FakeQuantLinear(W0, scale.float(), zp, bias, args, self.scheme.activations, input_scale)
            replace_module(work.layer, work.relative(fqn), modules[fqn])
        weights = [m.weight for m in modules.values()]
        scales = [m.scale for m in modules.values()]
        groups = [{"params": weights, "lr": qat.lr}, {"params": scales, "lr": qat.lr / 10}]

        def run(b: int, rows: list[int]) -> Tensor:
            h, (pos, kw) = work.inputs[b], work.calls[b]
            out = work.layer(h[rows], *pos, **rows_of(kw, rows, h.shape[0]))
            return out[0] if isinstance(out, tuple) else out

        def project() -> None:
            for m in modules.values():
                m.keep_scale_sign()

        result = fit_block(
            run, teacher, groups, qat.steps, qat.windows, torch.Generator().manual_seed(work.index), project=project,
            between_steps=interrupts.check, step_iter=work.progress.track(range(qat.steps), qat.steps, f"QAT {work.prefix}"),
            all_sum=work.world.all_reduce_,
        )  # fmt: skip
        first, last = result.loss_before, result.loss_after
        with torch.no_grad():
            for fqn, m in modules.items():
                q, scale, zp, bias, input_scale, W = quantized[fqn]
                scale_t = m.scale.detach().to(scale.dtype)
                q_new = quantize(m.weight.detach(), scale_t.float(), zp, args)
                q_new = torch.where(W != 0, q_new, expand_zero_point(zp, W.shape, args))  # pruned zeros stay zero
                quantized[fqn] = (q_new.to(torch.int8), scale_t, zp, bias, input_scale, W)
        log.info("QAT %s: layer loss %.3g → %.3g in %d steps", work.prefix, first, last, qat.steps)
        return f"{first:.3g} → {last:.3g}"

    # ---------------------------------------------------------------------------------- output

    def edit_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        from sparsify.checkpoint.compressed_tensors import quantization_config

        assert self.model is not None and self.matcher is not None
        linears, schemes = [], {}
        for fqn, module in self.model.named_modules():
            if isinstance(module, nn.Linear | QuantizedLinear):
                linears.append(fqn)
                if isinstance(module, QuantizedLinear) or self.matcher.selects(fqn, module):
                    schemes[fqn] = self.scheme_of(fqn)
        new = dict(cfg)
        new["quantization_config"] = quantization_config(schemes, linears)
        return new

    def notes(self) -> list[str]:
        c = self.config
        notes = []
        if self.budget is not None:
            b = self.budget
            int8 = sum(v == budget.INT8 for v in b["bits"].values())
            notes.append(
                f"pass {self.index}: bit budget {self._asked()}: {int8} of {len(b['bits'])} Linears int8, the rest"
                f" int4 ({8 * b['bytes'] / b['params']:.3f} bits per weight over them, {fmt_bytes(b['bytes'])};"
                f" the checkpoint's tensors {fmt_bytes(b['bytes'] + b['rest_bytes'])} predicted); predicted KL to the float"
                f" model {b['predicted_kl']:.3g} per token on the calibration (round-to-nearest; the KL to the input"
                f" this run measures, if it does, is on its evaluation text); {budget.mix_text(b['bits'])}"
            )
        if self.auto_group_why is not None:
            notes.append(
                f"pass {self.index}: {c.scheme} group size {c.weight_group} (the default's choice):"
                f" {self.auto_group_why} (--group-size sets another)"
            )
        if self.equalizer is not None and self.equalized:
            names = ", ".join(sorted(set(self.equalized)))
            what = f"SmoothQuant (alpha {c.smoothquant})" if c.smoothquant is not None else self.equalizer.title
            notes.append(f"pass {self.index}: {what} scales folded into {names} of every layer{self._awq_text()}")
        if self.skipped_pairs:
            notes.append(
                f"pass {self.index}: no scales between {'; '.join(sorted(self.skipped_pairs))}: the producer's"
                " outputs are not the consumers' inputs channel for channel (grouped KV heads)"
            )
        if self.scheme.activations is None:
            notes.append(
                f"pass {self.index}: {c.scheme} is weight-only: sparsify.load dequantizes it once at load (the file"
                " is smaller; the memory and speed are float's); vLLM runs it with its int4/int8 kernels"
            )
        if not self.scheme.weights.symmetric and self._quantizes_experts():
            notes.append(
                f"pass {self.index}: asymmetric weights on MoE experts: transformers 5 cannot load this checkpoint"
                " (its fused-expert dequantization drops the zero point); sparsify.load runs it"
            )
        if self.scheme.activations is not None and self._quantizes_experts():
            notes.append(
                f"pass {self.index}: {c.scheme} on MoE experts: transformers 5 cannot load this checkpoint (it fuses"
                " the experts and cannot fuse int8 ones with quantized activations); vLLM serves it and sparsify.load"
                " runs it (checked through sparsify.load before it was written)"
            )
        return notes

    def _awq_text(self) -> str:
        if not self.awq_found:
            return ""
        plain = [f for f in self.awq_found if f["ratio"] is None]
        gains = [f["error"] / f["plain_error"] for f in self.awq_found if f["plain_error"] > 0]
        mean = sum(gains) / max(len(gains), 1)
        return (
            f"; the consumers' output error on the calibration inputs {mean:.2f}x plain rounding's (mean over"
            f" {len(self.awq_found)} pairs; {len(plain)} kept plain rounding)"
        )

    def _quantizes_experts(self) -> bool:
        """Whether a quantized Linear is a routed expert's (``...experts.{e}...``), which transformers fuses."""
        if self.model is None or self.matcher is None:
            return False
        return any(".experts." in fqn and self.matcher.selects(fqn, m) for fqn, m in self.model.named_modules())

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        done = list({r["name"]: r for r in records if r.get("status") == "quantized"}.values())
        if not done:
            return []
        schemes = sorted({f"{r['scheme']} ({_group_text(r['group_size'])})" for r in done})
        params = sum(r["shape"][0] * r["shape"][1] for r in done)
        groups = {r["group_size"] for r in done}
        scale_bytes = sum(
            r["shape"][0] * (r["shape"][1] // r["group_size"] if isinstance(r["group_size"], int) else 1) * 2
            for r in done
        )
        q_bytes = sum(r["shape"][0] * r["shape"][1] * r["bits"] / 8 for r in done) + scale_bytes
        errors = [r["weight_error"] for r in done if r.get("weight_error") is not None]
        methods = sorted({_method_text(r) for r in done})
        return [
            ("quantized Linears", f"{len(done)}: {', '.join(schemes)}", "quantized_linears", len(done)),
            ("weights rounded by", "; ".join(methods), "quantize_methods", methods),
            (
                "Linear weights",
                f"{q_bytes / 2**20:.1f} MiB quantized, {8 * q_bytes / params:.2f} bits per weight with 16-bit"
                " scales (the size breakdown compares with the input as stored)",
                "quantized_linear_bytes",
                int(q_bytes),
            ),
            (
                "weight error",
                f"mean {sum(errors) / max(len(errors), 1):.2e} (relative, on the calibration inputs)",
                "mean_weight_error",
                sum(errors) / max(len(errors), 1),
            ),
            ("", "", "quantized_groups", sorted(str(g) for g in groups)),
        ]


# ------------------------------------------------------------------------------------- helpers


def _group_hint(widths: dict[str, int], config: QuantizeConfig) -> str:
    """The group sizes that divide every target's inputs (``widths``: fqn -> inputs), the one that exports to GGUF
    as stored marked; else per channel."""
    fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
    fits = fits or [g for g in (16, 8) if all(w % g == 0 for w in widths.values())][:1]
    gguf = config.gguf_type()
    named = [f"{g} (exports to GGUF {gguf} as stored)" if g == GGUF_BLOCK and gguf else str(g) for g in fits]
    if not named:
        return "use -1 (per channel)"
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]
    return f"{listed} {'divides' if len(named) == 1 else 'divide'} every quantized Linear's inputs; -1: per channel"


def _group_text(group: Any) -> str:
    return f"group {group}" if isinstance(group, int) else f"per {group}"


def _method_text(record: dict[str, Any]) -> str:
    """What rounded a record's weights, in words (the CLI's default, GPTQ with act-order, said plainly)."""
    method = str(record.get("method", ""))
    base, _, qat = method.partition(" + ")
    text = QUANTIZE_METHODS[base].title if base in QUANTIZE_METHODS else base
    if base == "gptq":
        text += " with activation order" if record.get("act_order") else " in column order"
    return text + (" + QAT (layer-wise, straight-through)" if qat else "")


def _weight_error(W: Tensor, W_q: Tensor, H: Tensor | None) -> float:
    """``tr(ΔW H ΔW^T) / tr(W H W^T)``: the relative output error on the calibration inputs (``H = I`` without one)."""
    D = (W - W_q.float()).float()  # (out, in)
    if H is None:
        return float(D.pow(2).sum() / W.float().pow(2).sum().clamp_min(1e-30))
    num = float((D @ H * D).sum())
    den = float((W.float() @ H * W.float()).sum())
    return num / den if den > 0 else math.nan


def _borrow_input_scales(quantized: dict[str, tuple]) -> None:
    """A static activation scale for each target that saw no calibration token (a starved routed expert, with
    ``expert_calibration: routed``): the largest of the layer's targets of the same name (the other experts'
    same projection), whose inputs come from the same place."""
    by_name: dict[str, list[Tensor]] = {}
    for fqn, entry in quantized.items():
        if entry[4] is not None:
            by_name.setdefault(fqn.rpartition(".")[2], []).append(entry[4])
    for fqn, (q, scale, zp, bias, input_scale, W) in quantized.items():
        if input_scale is None:
            peers = by_name.get(fqn.rpartition(".")[2])
            if not peers:
                raise SparsifyError(
                    f"{fqn}: saw no calibration tokens, and no Linear like it did: no static input scale"
                )
            quantized[fqn] = (q, scale, zp, bias, torch.stack(peers).amax(0), W)


__all__ = ["SCHEMES", "QuantizeConfig", "QuantizePass", "fake_quantize"]
