"""Which device calibration and evaluation run on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

from sparsify.errors import SparsifyError

CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec: str) -> str:
    """A device that exists here, as a torch device string; ``auto`` is the first GPU if there is one."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise SparsifyError(f"unknown device {spec!r}; use {CHOICES}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise SparsifyError(f"device {spec!r} is not supported; use {CHOICES}")
    if not torch.cuda.is_available():
        raise SparsifyError(f"device {spec!r}: no CUDA device is available here (torch {torch.__version__}); use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SparsifyError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)
