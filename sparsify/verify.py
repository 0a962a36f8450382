"""Checks on what a run reads and what it writes: nothing wrong goes in, nothing wrong comes out.

- :func:`check_finite`: every floating-point tensor of the input is finite (a NaN or Inf would spread
  through calibration into every later layer, silently).
- :func:`check_written`: the finished output, before it is renamed into place: every config value that
  implies a shape agrees with every tensor, transformers' own loader reports no missing, unexpected or
  mismatched keys, and one forward gives finite outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sparsify import interrupts
from sparsify.arch import SPARSIFY_TYPE_PREFIX, is_encoder, lookup
from sparsify.checkpoint import TensorSource, open_model, verify
from sparsify.errors import SparsifyError
from sparsify.progress import NoProgress, Progress, library_bars_silenced

log = logging.getLogger(__name__)
FORWARD_TOKENS = 16  # tokens of the check's one forward


def check_finite(source: TensorSource, progress: Progress | None = None) -> None:
    """Refuse an input with a NaN or Inf in any floating-point tensor, naming the first such tensor."""
    progress = progress or NoProgress()
    keys = [k for k in source.keys() if source.info(k).dtype.is_floating_point]
    for key, tensor in progress.track(source.iter_tensors(keys), len(keys), "checking the input's tensors"):
        interrupts.check()
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SparsifyError(
                f"input tensor {key} holds {bad} NaN/Inf value(s) of {tensor.numel()}: the checkpoint is"
                " damaged (or was saved from a diverged run); sparsify compresses finite weights only"
            )


def check_written(
    folder: Path, trust_remote_code: bool = False, tokens: torch.Tensor | None = None, copied: set[str] | None = None
) -> list[str]:
    """The output in ``folder`` as a user will load it (see the module docstring); raises SparsifyError
    naming the first problem, so that the caller never renames it into place. ``copied``: the input's keys,
    which may be unexpected to the loader as they were in the input (an MLM head beside an encoder). Returns notes."""
    md = open_model(folder)
    config = md.load_config(trust_remote_code)
    encoder = is_encoder(config.model_type)
    arch = lookup(config.model_type)
    try:
        notes = verify(md.source, config, arch.layers if arch else None, arch.optional if arch else (), encoder,
                       trust_remote_code)  # fmt: skip
    except SparsifyError as e:
        raise SparsifyError(f"the output failed its check, so it was not written: {e}") from e
    model, info = _load(folder, config, encoder, trust_remote_code)
    optional = arch.optional if arch else ()  # parts a checkpoint may lack (an encoder's pooler): not needed
    params = dict(model.named_parameters())
    info["missing_keys"] = [
        k
        for k in info.get("missing_keys", ())
        if not any(k.startswith(o + ".") for o in optional) and not (k in params and params[k].numel() == 0)
    ]
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", ()) if k not in (copied or set())]
    problems = {k: v for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise SparsifyError(
            f"the output failed its check, so it was not written: transformers reports {len(keys)}"
            f" {kind.replace('_', ' ')} loading it, e.g. {sorted(map(str, keys))[0]}"
        )
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 2
    ids = tokens[0, :FORWARD_TOKENS] if tokens is not None else torch.arange(FORWARD_TOKENS) % vocab
    with torch.no_grad(), library_bars_silenced():  # (a quantized model decompresses itself on its first forward)
        out = model(input_ids=ids.reshape(1, -1).long())
    values = out.last_hidden_state if encoder else out.logits
    if not bool(torch.isfinite(values).all()):
        raise SparsifyError(
            "the output failed its check, so it was not written: its first forward gives NaN/Inf"
            f" {'hidden states' if encoder else 'logits'}"
        )
    return notes


def _load(folder: Path, config: Any, encoder: bool, trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
    """The output loaded as its users load it, and the loader's report of keys it could not place."""
    from transformers import AutoModel, AutoModelForCausalLM

    from sparsify.checkpoint.compressed_tensors import can_run, is_compressed_tensors
    from sparsify.loading import load as sparsify_load
    from sparsify.runtime.attention import register
    from sparsify.runtime.format import register_model_type
    from sparsify.runtime.moe import zero_width_quiet

    if (
        is_compressed_tensors(config)
        and can_run(config) is None
        and (_asymmetric(config) or _activations_quantized(config))
        and _experts_one_by_one(folder)
    ):
        # quantized experts transformers 5 cannot fuse: asymmetric ones (it drops their zero points) and int8
        # ones with quantized activations (W8A8: its fusing conversion finds no tensor to concatenate); the run's
        # notes say so. sparsify.load builds the model from the checked tensors (verify above), as for its users
        return sparsify_load(folder, trust_remote_code=trust_remote_code, kernel="exact").eval(), {}
    kwargs: dict[str, Any] = {}
    if str(config.model_type).startswith(SPARSIFY_TYPE_PREFIX):
        register_model_type(config.model_type)
        register()
        kwargs["attn_implementation"] = "sparsify"
    cls = AutoModel if encoder else AutoModelForCausalLM
    try:
        with library_bars_silenced(), zero_width_quiet():
            model, info = cls.from_pretrained(
                folder, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
            )
    except Exception as e:
        raise SparsifyError(
            f"the output failed its check, so it was not written: transformers cannot load it: {e}"
        ) from e
    return model.eval(), info


def _asymmetric(config: Any) -> bool:
    from sparsify.checkpoint.compressed_tensors import quantization_dict

    groups = (quantization_dict(config) or {}).get("config_groups") or {}
    return any((g.get("weights") or {}).get("symmetric") is False for g in groups.values())


def _activations_quantized(config: Any) -> bool:
    from sparsify.checkpoint.compressed_tensors import quantization_dict

    groups = (quantization_dict(config) or {}).get("config_groups") or {}
    return any(g.get("input_activations") for g in groups.values())


def _experts_one_by_one(folder: Path) -> bool:
    md = open_model(folder)
    return any(".experts.0." in k for k in md.source.keys())
