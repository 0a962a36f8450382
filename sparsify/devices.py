"""Which device calibration and evaluation run on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

import contextlib
import os
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


def available_memory(device: str = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device`` (None: unknown): a GPU's free memory; on the CPU the
    kernel's ``MemAvailable``, or less where a cgroup (a container) limits this process to less."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    if not found:  # no /proc (not Linux): the free pages
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            cap = int(Path(limit).read_text().split()[0])  # "max" (no limit) is not a number
            used = int(Path(usage).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if cap < 1 << 60:
            found.append(max(0, cap - used))
    return min(found) if found else None


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


def has_bf16_units(device: str = "cpu") -> bool:
    """Whether ``device`` has bf16 matrix units: a CPU with AVX-512 BF16 or AMX, a GPU torch runs bf16 on."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_speedup(n_in: int, n_out: int, device: str = "cpu", tokens: int = 1024, repeats: int = 5) -> float:
    """How many times faster a Linear's forward and backward (``tokens`` rows, ``n_in -> n_out``) runs under
    bf16 autocast than in fp32 on ``device``: the best of ``repeats`` each, interleaved, after a warm-up. Above
    1 where the chip has bf16 units (AMX, AVX-512 BF16, tensor cores) and the shape is large enough to use
    them; far below 1 on a CPU with AVX2 only."""
    import time

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(device)
    W = torch.randn(n_out, n_in, generator=gen).div_(n_in**0.5).to(device).requires_grad_(True)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = F.linear(x, W)  # (tokens, out)
        y.float().square().mean().backward()
        W.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(dtype: torch.dtype | None) -> float:
        t0 = time.perf_counter()
        step(dtype)
        return time.perf_counter() - t0

    try:
        step(None), step(torch.bfloat16)  # warm-up
        pairs = [(timed(None), timed(torch.bfloat16)) for _ in range(repeats)]  # interleaved: the same load
    except RuntimeError:  # no bf16 kernels for this device in this build
        return 0.0
    return min(f for f, _ in pairs) / min(b for _, b in pairs)
