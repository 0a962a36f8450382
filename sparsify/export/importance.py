"""Each Linear's input importance on calibration text, for the K-quants' weighted scale fit.

The importance of input column ``j`` of a Linear is the mean over calibration tokens of ``x_j ** 2``: the
diagonal of ``X^T X / N``, what llama.cpp's ``llama-imatrix`` accumulates and ``llama-quantize --imatrix`` weights
each weight's rounding error by. Here it is measured by sparsify's own calibration sweep (one decoder layer in
memory at a time, the statistics of q/k/v gathered once), on the same windows a compressing run would calibrate
on, so that an export is reproducible byte for byte from the model and its settings; or read from a file
``llama-imatrix`` wrote (:func:`read_imatrix`), so that a llama.cpp user's importance matrix serves as it is.
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


def read_imatrix(path: str | Path) -> dict[str, Tensor]:
    """``{GGUF tensor name: (in,) float32}`` from a ``llama-imatrix`` GGUF file: each matrix's ``in_sum2`` over its
    ``counts`` (the mean square of each input column, as ``llama-quantize --imatrix`` reads it). Stacked experts
    (one row per expert) are left out: their blocks are fitted unweighted here."""
    from gguf import GGUFReader

    try:
        tensors = {t.name: t for t in GGUFReader(path).tensors}
    except Exception as e:  # a truncated or foreign file: gguf-py's own message
        raise SparsifyError(f"--importance {path}: not a GGUF file llama-imatrix wrote ({e})") from e
    found = {}
    for name, t in tensors.items():
        base = name.removesuffix(".in_sum2")
        if base == name or f"{base}.counts" not in tensors:
            continue
        sums = torch.from_numpy(t.data.astype("float64").copy())  # (experts, in) or (in,)
        counts = torch.from_numpy(tensors[f"{base}.counts"].data.astype("float64").copy()).reshape(-1)  # (experts,)
        if (sums.ndim == 1 or sums.shape[0] == 1) and counts[0] > 0:  # one matrix (not stacked experts), seen
            found[base] = (sums.reshape(-1) / counts[0]).float()
    if not found:
        raise SparsifyError(f"--importance {path}: no importance matrix in it (llama-imatrix's in_sum2 and counts)")
    return found


def importance_for(tensors: list, md, config, progress: Progress | None = None) -> dict[str, Tensor]:
    """GGUF tensor name -> the ``(in,)`` importance its blocks are fitted with, as ``config.importance`` says:
    measured on calibration text, read from a llama-imatrix file (each checked against the tensor's width), or
    none (empty)."""
    if config.importance == "none":
        return {}
    if config.importance == "calibration":
        found = input_importance(md, config.calib, config.samples, config.seq_len, config.seed, progress)
        return importance_of(tensors, found)
    read = read_imatrix(config.importance)
    out = {}
    for t in tensors:
        if t.name in read:
            if read[t.name].numel() != t.shape[-1]:
                raise SparsifyError(
                    f"--importance {config.importance}: {t.name} has {read[t.name].numel()} columns there and"
                    f" {t.shape[-1]} in this model: the importance matrix is another model's"
                )
            out[t.name] = read[t.name]
    return out
