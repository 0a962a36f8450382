"""Which device calibration and evaluation run on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

from pathlib import Path

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


def cpu_flags() -> str:
    """This CPU, as speed figures must name it: model name, the vector and matrix units that decide kernel speed
    (AVX2, AVX-512, BF16, VNNI, AMX), and torch's thread count."""
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"unknown CPU; {torch.get_num_threads()} threads"
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    return f"{model}; {' '.join(f for f in wanted if f in flags) or 'no AVX2'}; {torch.get_num_threads()} threads"
