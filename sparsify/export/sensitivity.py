"""How much each weight matters to the model's predictions: the diagonal of the model's Fisher information.

The Fisher of the model, not the empirical one: each token's label is drawn from the model's own prediction at that
token (seeded), not read from the text. The KL divergence of a changed model from this one has the model's Fisher
as its curvature; the empirical Fisher (the text's next tokens as labels) differs from it wherever the model is
unsure, and with it the budget lost to llama.cpp's Q5_K_M mix at its bytes (KL 0.0333 vs 0.0289 on a grid-free
SmolLM2, docs/benchmarks.md §8), where with the model's Fisher it wins (0.0264).

For a Linear ``y_t = W x_t`` at token ``t``, with ``g_t = dS/dy_t`` the gradient of the windows' summed negative
log-likelihood ``S`` of the drawn labels at its output, token ``t`` contributes ``g_t x_t^T`` to ``dS/dW``; the
per-token Fisher diagonal is ``F = sum_t (g_t^2)(x_t^2)^T / N`` over the ``N`` predicted tokens (one matrix product
per Linear and batch, from a forward and a backward hook: no per-window backward pass, no weight gradients). An
embedding row ``v`` gathers ``(dS/de_t)^2`` over the tokens ``t`` that are ``v``; a tied output head adds its Linear's share to
the same matrix. A small change ``dW`` moves the model's predictions by a KL divergence of about
``0.5 * sum(F * dW**2)`` per token (the Fisher is the KL divergence's curvature at the model):
:mod:`sparsify.export.budget` predicts each tensor's damage at each type with it, as SqueezeLLM and HAWQ-style
mixed precision weigh rounding errors.

The whole float model is held in memory (and one batch's activations for the backward pass): fine for the models
a 2-core machine exports; larger ones want a GPU (``device``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsify.calibration.fisher import linear_hook
from sparsify.evaluate import load_causal_lm
from sparsify.export.importance import calibration_windows
from sparsify.progress import NoProgress, Progress

BATCH = 4  # windows per forward and backward


def weight_fisher(
    md,
    text: str | None,
    samples: int,
    seq_len: int | None,
    seed: int = 0,
    names: set[str] | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """``{parameter name: float32 tensor of its shape}``: the per-token Fisher diagonal of each Linear's and
    embedding's weight named in ``names`` (None: all), over the ``samples`` windows of ``seq_len`` tokens of
    ``text`` sampled with ``seed`` that :func:`sparsify.export.importance.input_importance` reads."""
    windows = calibration_windows(md, md.load_config(), text, samples, seq_len, seed)  # (samples, seq_len)
    model = load_causal_lm(Path(md.path), torch.float32, device=device)
    model.requires_grad_(False)
    named = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    fisher: dict[str, Tensor] = {}
    handles = []
    for module in model.modules():
        name = named.get(id(getattr(module, "weight", None)))
        if name is None or (names is not None and name not in names):
            continue
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(fisher, name, module.weight.shape)))
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_hook(_embedding_hook(fisher, name, module.weight)))
    tokens = 0
    if not handles:
        return {}
    draw = torch.Generator(device=device).manual_seed(seed)
    try:
        batches = windows.split(BATCH)
        for batch in (progress or NoProgress()).track(batches, len(batches), "sensitivity of each weight (Fisher)"):
            x = batch.to(device)  # (B, L)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, L-1, vocab)
            flat = logits.reshape(-1, logits.shape[-1])  # (B (L-1), vocab)
            with torch.no_grad():  # each token's label drawn from the model's own prediction
                y = torch.multinomial(flat.softmax(-1), 1, generator=draw)[:, 0]  # (B (L-1),)
            nn.functional.cross_entropy(flat, y, reduction="sum").backward()
            tokens += x[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (f / max(tokens, 1)).cpu() for n, f in fisher.items()}


def _embedding_hook(fisher: dict[str, Tensor], name: str, weight: Tensor) -> Callable:
    """Forward hook: each token's output gradient, squared, added to its row; the output made to carry gradients
    (the parameters do not), so that the backward pass reaches every hook."""

    def hook(_module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        ids = args[0].detach().reshape(-1)  # (tokens,)
        out = out.detach().requires_grad_()

        def backward(g: Tensor) -> None:
            if name not in fisher:
                fisher[name] = torch.zeros(weight.shape, device=weight.device)
            fisher[name].index_add_(0, ids, g.reshape(-1, g.shape[-1]).float().square())  # (vocab, dim)

        out.register_hook(backward)
        return out

    return hook
