"""Running poise under ``torch.distributed`` (DDP, FSDP2), and checking that it matches one process.

poise adds no engine of its own: launch with ``torchrun`` (or ``torch.multiprocessing``), wrap the
model in ``DistributedDataParallel`` or ``fully_shard``, and use poise's optimizers as usual.

Shard safety. An optimizer whose every stage is elementwise (AdamW, SPAM, CLASSP) computes the
same update on a shard as on the whole tensor, so under FSDP2 (DTensor parameters) it runs on
the local shards as is: ``shard_safe = True``. The others need whole matrices or whole-tensor
norms (SOAP's preconditioner bases, GaLore/Q-GaLore/FRUGAL's projections, Stable-SPAM's
gradient-norm EMA): ``shard_safe = False``; for DTensor parameters the adapter gathers each
gradient and parameter to its full tensor, runs the transform on it (its state is then full and
replicated on every rank: memory, not accuracy, is the price) and adds back the local shard of
the update. Under DDP every rank holds whole tensors and the all-reduced gradient, so every
optimizer gives the single-process result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_main", "launch", "rank_world", "shard_safety"]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
    if there is one; returns ``(rank, world_size)``, ``(0, 1)`` when not launched distributed."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), dist.get_world_size()


def rank_world(shard: bool | str = "auto") -> tuple[int, int]:
    """``(rank, world_size)`` of this process for sharding work, ``(0, 1)`` when not distributed.

    ``shard``: ``"auto"`` or True use the initialised process group (if any); False never
    shards and returns ``(0, 1)``. Anything else raises ``ValueError`` listing the choices."""
    if shard not in ("auto", True, False):
        raise ValueError(f"shard={shard!r}; valid choices: 'auto', True, False")
    if shard is False or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 or when not distributed: the rank that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by gloo (what
    ``torchrun --nproc_per_node`` does, from Python: for tests and notebooks). ``fn`` must be
    importable by name (a module-level function)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def shard_safety() -> dict[str, bool]:
    """``{optimizer name: shard_safe}`` for every registered optimizer."""
    from poise import _registry

    return {n: bool(getattr(_registry.get("optimizer", n), "shard_safe", False)) for n in _registry.names("optimizer")}
