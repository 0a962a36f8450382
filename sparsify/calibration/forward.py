"""The last step of each layer: run the compressed layer to produce the next layer's inputs (as SparseGPT
does), measuring on the first batch how far its outputs moved from the dense layer's."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.calibration.gather import hooked
from sparsify.calibration.work import LayerCall, run_layer
from sparsify.modules import effective_weight


def relative_error(out: list[Tensor], ref: list[Tensor]) -> float:
    """``||out - ref||^2 / ||ref||^2`` over every batch (0 when ``ref`` is all zeros)."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref, strict=True))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / den if den > 0 else 0.0


@torch.no_grad()
def feed_forward(
    prefix: str,
    layer: nn.Module,
    dense: dict[str, Tensor],
    reference: list[Tensor],
    hidden: list[Tensor],
    calls: list[LayerCall],
    errors: dict[str, float],
) -> list[Tensor]:
    """Run the compressed layer over every batch. On the first batch (``ERROR_WINDOWS`` windows) also
    measure the layer's relative output error ``||y - y_dense||^2 / ||y_dense||^2`` against ``reference``
    (the dense layer's first-batch outputs) and the same for each Linear of ``dense`` (fqn -> its dense
    weight) that kept its shape (one extra matmul per Linear on a few windows), into ``errors``."""
    modules = {f"{prefix}.{n}": m for n, m in layer.named_modules() if n}
    still = {
        fqn: modules[fqn]
        for fqn, W in dense.items()
        if fqn in modules and (E := effective_weight(modules[fqn])) is not None and E.shape == W.shape
    }
    sums = {fqn: [0.0, 0.0] for fqn in still}

    def hook(fqn: str) -> Callable:
        def measure(module: nn.Module, args: tuple, out: Tensor) -> None:
            bias = getattr(module, "bias", None)
            ref = F.linear(args[0].float(), dense[fqn], None if bias is None else bias.float())  # (.., out)
            sums[fqn][0] += float((out.float() - ref).pow(2).sum())
            sums[fqn][1] += float(ref.pow(2).sum())

        return measure

    with hooked(still, hook):
        first = run_layer(layer, hidden[:1], calls[:1])
    if not first:  # no calibration data: nothing measured (never a 0.0 that looks like a result)
        return []
    for fqn, (num, den) in sums.items():
        errors[fqn] = num / den if den > 0 else 0.0
    errors[prefix] = relative_error(first, reference)
    return first + run_layer(layer, hidden[1:], calls[1:])
