"""Each Linear's input importance on calibration text, for the K-quants' weighted scale fit.

The importance of input column ``j`` of a Linear is the mean over calibration tokens of ``x_j ** 2``: the
diagonal of ``X^T X / N``, what llama.cpp's ``llama-imatrix`` accumulates and ``llama-quantize --imatrix`` weights
each weight's rounding error by. Here it is measured by sparsify's own calibration sweep (one decoder layer in
memory at a time, the statistics of q/k/v gathered once), on the same windows a compressing run would calibrate
on, so that an export is reproducible byte for byte from the model and its settings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sparsify.calibration import LayerwiseRunner
from sparsify.checkpoint.lazy import LazyLayers
from sparsify.checkpoint.stage_model import Layers, load_outside_layers, open_stage_model
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.errors import SparsifyError
from sparsify.evaluate import load_tokenizer
from sparsify.progress import NoProgress, Progress

BATCH = 8  # calibration windows per forward
DEFAULT_SEQ_LEN = 512


def calibration_windows(md, config, text: str | None, samples: int, seq_len: int | None, seed: int) -> Tensor:
    """``(samples, seq_len)`` token windows of ``text`` (None: the embedded calibration text) sampled with ``seed``;
    ``seq_len`` None: 512, or the model's whole context if shorter; longer than the context: refused."""
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, int(limit or DEFAULT_SEQ_LEN))
    elif limit and seq_len > limit:
        raise SparsifyError(f"--seq-len {seq_len} is beyond the model's context (max_position_embeddings {limit})")
    tokenizer = load_tokenizer(Path(md.path))
    return sample_windows(tokenize(load_text(text, tokenizer=tokenizer), tokenizer), samples, seq_len, seed)


def input_importance(
    md,
    text: str | None,
    samples: int,
    seq_len: int | None,
    seed: int = 0,
    progress: Progress | None = None,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """``{fqn: (in,) float32}``: the mean square of each input column of every ``nn.Linear`` inside the decoder
    layers of the model folder ``md`` over ``samples`` windows of ``seq_len`` tokens (None: 512, or the model's
    context if shorter) of ``text`` (None: the embedded calibration text), sampled with ``seed``."""
    config = md.load_config()
    tokens = calibration_windows(md, config, text, samples, seq_len, seed)  # (samples, seq_len)
    skel = open_stage_model(md, config, False, torch.float32)
    layers = Layers.of(skel.model)
    load_outside_layers(skel, layers, md, torch.float32, device)
    dev = torch.device(device)
    provider = LazyLayers(layers.modules, layers.path, md.source, skel.keymap, None, torch.float32, dev)
    runner = LayerwiseRunner(
        skel.model.base_model, layers.modules, provider, tokens, BATCH, progress or NoProgress(), dev, layers.path
    )
    found: dict[str, Tensor] = {}

    def linears(i: int, layer: nn.Module) -> dict[str, nn.Module]:
        return {f"{runner.prefix(i)}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}

    def keep(work, _outputs) -> None:
        for fqn, stats in work.stats.items():
            found[fqn] = stats.mean("sq_norm").float().cpu()  # (in,)

    runner.observe(keep, "importance of each Linear's inputs", linears, {"sq_norm"})
    return found


def importance_of(tensors: list, found: dict[str, Tensor]) -> dict[str, Tensor]:
    """GGUF tensor name -> its Linear's measured importance ``(in,)``, for the tensors written from one checkpoint
    weight (``sources``: ``model.layers.0.mlp.down_proj.weight``); the others (stacked experts, a fused tensor)
    have none."""
    out = {}
    for t in tensors:
        key = t.sources[0].removesuffix(".weight") if len(t.sources) == 1 else None
        if key is not None and key in found:
            out[t.name] = found[key]
    return out
