"""How much each weight matters to the model's predictions, layer by layer: the per-token diagonal of the
empirical Fisher information of every target Linear's weight.

For a Linear ``y_t = W x_t`` at token ``t``, with ``g_t = dS/dy_t`` the gradient of the windows' summed negative
log-likelihood ``S`` at its output, the per-token Fisher diagonal is ``F = sum_t (g_t^2)(x_t^2)^T / N`` over the
``N`` predicted tokens (:func:`linear_hook`: one matrix product per Linear and batch, no weight gradients). A small
change ``dW`` moves the model's predictions by a KL divergence of about ``0.5 * sum(F * dW**2)`` per token, which
is what a bit budget weighs each Linear's rounding error by (SqueezeLLM, HAWQ-style mixed precision).

:func:`layer_fisher` needs no whole model in memory, as the compressing sweep does not: one forward sweep keeps
every layer's inputs on the first windows, the model's own head (final norm, LM head) gives the loss's gradient at
the last hidden states, and a backward sweep from the last layer to the first loads each layer again, runs it with
gradients on its input and passes the gradient down. Memory: the kept inputs (windows x tokens x hidden x layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.calibration.runner import LayerwiseRunner
from sparsify.calibration.work import run_layer
from sparsify.modules import replaying

WINDOWS = 16  # calibration windows the Fisher is gathered on: the first ones (under torchrun, each rank its share)


def linear_hook(
    fisher: dict[str, Tensor], name: str, shape: torch.Size, seen: dict[str, int] | None = None
) -> Callable:
    """Forward hook: the output's gradient meets the saved input in ``fisher[name] += (g^2)^T (x^2)`` (and
    ``seen[name]`` counts the tokens that reached it: a routed expert may see none)."""

    def hook(_module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x2 = args[0].detach().reshape(-1, args[0].shape[-1]).float().square()  # (tokens, in)
        out = out if out.requires_grad else out.detach().requires_grad_()

        def backward(g: Tensor) -> None:
            g2 = g.reshape(-1, g.shape[-1]).float().square()  # (tokens, out)
            if name not in fisher:
                fisher[name] = torch.zeros(shape, device=g.device)
            fisher[name].add_(g2.T @ x2)  # (out, in)
            if seen is not None:
                seen[name] = seen.get(name, 0) + g2.shape[0]

        out.register_hook(backward)
        return out

    return hook


def layer_fisher(
    runner: LayerwiseRunner,
    model: nn.Module,
    targets: Callable[[int, nn.Module], dict[str, nn.Module]],
    windows: int = WINDOWS,
) -> dict[str, Tensor]:
    """``{fqn: float32 (out, in)}``: the per-token Fisher diagonal of each target Linear's weight over the first
    ``windows`` calibration windows. ``model``: the whole model whose backbone the runner sweeps, its head loaded
    (the layers may be on the meta device: they are replayed)."""
    batches, sizes, first = runner.batches(), [], runner.first_window()
    for b in batches:  # this rank's batches among the first ``windows`` of the calibration (one process: all)
        if first + sum(sizes) >= windows:
            break
        sizes.append(int(b.shape[0]))
    tokens = batches[: len(sizes)]
    cap = runner.capture(tokens)  # the layers' inputs on those windows only
    hidden = cap.hidden
    kept: list[list[Tensor]] = []  # per layer, per batch: the layer's input (B, L, d)
    with torch.no_grad():
        for i in runner.progress.track(range(len(runner.layers)), len(runner.layers), "Fisher, forward"):
            interrupts.check()
            layer = runner.provider.load(i)
            kept.append(hidden)
            hidden = run_layer(layer, hidden, cap.calls[i])
            runner.provider.finish(i, layer, write=False)
    grads = []  # per batch: dS/dh at the current layer's output (B, L, d)
    for tok, h in zip(tokens, hidden, strict=True):
        h = h.detach().requires_grad_()
        with replaying(runner.layers, [h]):
            logits = model(input_ids=tok.to(runner.device), use_cache=False).logits.float()  # (B, L, vocab)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten().to(logits.device), reduction="sum"
        )
        (g,) = torch.autograd.grad(nll, h)
        grads.append(g)
    fisher: dict[str, Tensor] = {}  # this layer's accumulators, on the device
    seen: dict[str, int] = {}
    out_: dict[str, Tensor] = {}  # every layer's, summed over the ranks, on the CPU
    backward = range(len(runner.layers) - 1, -1, -1)
    for i in runner.progress.track(backward, len(runner.layers), "Fisher, backward"):
        interrupts.check()
        layer = runner.provider.load(i)
        found = targets(i, layer)
        hooks = [m.register_forward_hook(linear_hook(fisher, fqn, m.weight.shape, seen)) for fqn, m in found.items()]
        try:
            for b, (h, (args, kwargs)) in enumerate(zip(kept[i], cap.calls[i], strict=True)):
                h = h.detach().requires_grad_()
                out = layer(h, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out  # (B, L, d)
                (grads[b],) = torch.autograd.grad(out, h, grads[b])
        finally:
            for handle in hooks:
                handle.remove()
        for fqn in sorted(found):  # every rank reduces every target, in one order (a starved expert: zeros)
            acc = fisher.pop(fqn, None)
            acc = acc if acc is not None else torch.zeros(found[fqn].weight.shape, device=runner.device)
            tokens_seen = torch.tensor(float(seen.pop(fqn, 0)))
            runner.world.all_reduce_(acc)
            runner.world.all_reduce_(tokens_seen)
            if tokens_seen > 0:  # a Linear no token reached (a routed expert) has no Fisher: the caller fills it
                out_[fqn] = acc.cpu()
        kept[i] = []
        runner.provider.finish(i, layer, write=False)
    count = torch.tensor(float(sum(t[:, 1:].numel() for t in tokens)))
    runner.world.all_reduce_(count)
    return {name: f / count.clamp_min(1) for name, f in out_.items()}
