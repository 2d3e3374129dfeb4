"""Data-parallel helpers: identical schedules on every rank, and no gradient traffic for frozen layers.

SlimFit under ``DistributedDataParallel`` needs two things:

* DDP must be built while every parameter still requires grad (before ``SlimFit(...)`` freezes layers),
  with ``find_unused_parameters=True``: DDP fixes its buckets at construction and, without that flag,
  waits forever for gradients of layers that are frozen this step.
* Every rank must freeze the same layers. :func:`broadcast_indices` makes rank 0's choice the rule.

:func:`register_trainable_only_hook` then all-reduces only the gradients of parameters that require grad,
so a 90%-frozen model sends about a tenth of the bytes DDP would send.
"""

# No `from __future__ import annotations` here: DDP checks the hook's `bucket` annotation at runtime.
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_indices(indices: list[int], src: int = 0) -> list[int]:
    """Rank ``src``'s list of ints on every rank (unchanged when not running distributed)."""
    if not is_distributed():
        return indices
    payload = [indices]
    dist.broadcast_object_list(payload, src=src)
    return list(payload[0])


def _completed(buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


def _trainable_only_allreduce(
    group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    live = [g for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True) if p.requires_grad]
    if not live:
        return _completed(buffer)
    flat = torch.cat([g.reshape(-1) for g in live])
    flat.div_(dist.get_world_size(group))
    # Blocking on purpose: a Python `.then` callback on the collective's future is released on gloo's worker
    # thread, which then needs the GIL while process-group teardown joins that thread holding it (deadlock).
    dist.all_reduce(flat, group=group)
    start = 0
    for g in live:
        g.copy_(flat[start : start + g.numel()].view_as(g))
        start += g.numel()
    return _completed(buffer)


def register_trainable_only_hook(model: DistributedDataParallel, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce only the gradients of parameters with ``requires_grad=True`` (same set on every rank)."""
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(f"model must be a DistributedDataParallel module, got {type(model).__name__}")
    model.register_comm_hook(state=group, hook=_trainable_only_allreduce)
