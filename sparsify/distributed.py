"""Data parallelism on ``torch.distributed``: what one process of a ``torchrun`` job is, and the few collectives
the calibration loop needs.

``torchrun --nproc-per-node N -m sparsify prune ...`` starts N copies of the command; each reads the same
model and recipe, takes its own share of the calibration windows, and runs the same layer loop. Every statistic
a pass declares is summed (or maxed) over the ranks before the pass sees it, so each rank solves from the
statistics of all the windows; the per-Linear solves of a stage are spread over the ranks and each result
broadcast from the rank that computed it. Rank 0 writes the output; the others build theirs in a scratch folder
they remove. Outside torchrun (no ``WORLD_SIZE``) everything here is a no-op on a world of one.

Backends: gloo on CPU, NCCL with ``--device cuda`` (each rank takes the GPU of its ``LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparsify.errors import SparsifyError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=2)  # rank 0 evaluates and writes while the others wait


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where collectives run: the rank's GPU under NCCL (which cannot reduce CPU tensors)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (rank 0 takes the first: the windows errors are measured on)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def share(self, n: int) -> int:
        """How many of ``n`` items are this rank's (the length of :meth:`shard`)."""
        return len(range(n)[self.shard(n)])

    def _wire(self, t: Tensor) -> Tensor:
        """``t`` as a collective can take it: contiguous, on the backend's device (``t`` itself where it is)."""
        if t.device == torch.device(self.device) and t.is_contiguous():
            return t
        return t.to(self.device, memory_format=torch.contiguous_format)

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` summed (``op="sum"``) or maxed (``"max"``) over the ranks, in place (wherever ``t`` lives)."""
        if self.active:
            import torch.distributed as dist

            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            buf = self._wire(t)
            dist.all_reduce(buf, op=ops[op])
            if buf is not t:
                t.copy_(buf)
        return t

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (``(n_r, ...)``, ``n_r`` may differ) concatenated in rank order along dim 0."""
        if not self.active:
            return t
        import torch.distributed as dist

        sizes = self.gather_objects(int(t.shape[0]))
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable: a module is sent whole, tensors and all)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_to_(self, t: Tensor, src: int = 0) -> None:
        """``t`` overwritten in place with rank ``src``'s (same shape and dtype; any layout, any device)."""
        if not self.active:
            return
        import torch.distributed as dist

        buf = self._wire(t.to(torch.uint8) if t.dtype == torch.bool else t)  # not every backend sends bool
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)

    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Every parameter and buffer of ``module`` as rank ``src`` holds it (shapes already agree)."""
        if not self.active:
            return
        for t in [*module.parameters(), *module.buffers()]:
            self.broadcast_to_(t.data, src)

    def agree(self, error: str | None) -> None:
        """A collective check: when any rank met ``error`` (a refusal before work), every rank raises it."""
        if not self.active:
            if error is not None:
                raise SparsifyError(error)
            return
        errors = self.gather_objects(error)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            rank, message = first
            raise SparsifyError(message if rank == self.rank or rank == 0 else f"rank {rank}: {message}")

    def checked(self, fn: Callable[[], T]) -> T:
        """``fn()``, with every rank told when any rank refused (each raises the refusal, none waits forever)."""
        try:
            result = fn()
        except SparsifyError as e:
            self.agree(str(e))
            raise
        self.agree(None)
        return result

    def same(self, what: str, value: Any) -> None:
        """Refuse unless every rank has the same ``value`` (the model, the recipe, the calibration data)."""
        if not self.active:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
        digests = self.gather_objects(digest)
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise SparsifyError(
                f"torchrun: rank(s) {differ} have another {what} than rank 0; every rank must run the same"
                " command on the same files"
            )

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World()


class PeerLost(SparsifyError):
    """Another rank of the torchrun job ended (failed, killed): this one stops too. Like an interruption by signal,
    it keeps its finished layers for the next ``--resume``."""

    keep_partial = True


def is_peer_error(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError)


def from_env(device: str) -> World:
    """The world torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...), its
    process group started; a world of one outside torchrun. A backend that cannot work is refused here."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SparsifyError(f"torchrun with --device {device}: NCCL needs CUDA GPUs and none is available here")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SparsifyError(
                f"torchrun: local rank {local} has no GPU of its own ({torch.cuda.device_count()} here);"
                " start at most one process per GPU"
            )
        torch.cuda.set_device(local)
        backend, comm = "nccl", f"cuda:{local}"
    else:
        backend, comm = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank=rank, size=size, device=comm)


def device_of(world: World, device: str) -> str:
    """The device a rank computes on: with CUDA under torchrun, its own GPU (``cuda:LOCAL_RANK``)."""
    if world.active and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def end_world(world: World) -> None:
    """The ranks' last meeting: each waits for the others, then the process group ends (no collective after);
    rank 0 goes on alone (checks, evaluation) with the threads of the ranks that ran beside it."""
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        shutdown(world)
        if world.leader:  # the other ranks on this machine are done: rank 0 takes their threads too
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(min(os.cpu_count() or 1, torch.get_num_threads() * local))


def shutdown(world: World) -> None:
    """The process group ended, if it is still up (whatever happened)."""
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
