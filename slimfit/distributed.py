"""Data-parallel helpers: identical schedules on every rank, and no gradient traffic for frozen layers.

SlimFit under ``DistributedDataParallel`` needs two things:

* DDP must be built while every parameter still requires grad (before ``SlimFit(...)`` freezes layers),
  with ``find_unused_parameters=True``: DDP fixes its buckets at construction and, without that flag,
  waits forever for gradients of layers that are frozen this step.
* Every rank must freeze the same layers. :func:`broadcast_indices` makes the first rank's choice the rule
  (rank 0, or the first member of the process group SlimFit was given).

:func:`register_trainable_only_hook` then all-reduces only the gradients of parameters that require grad,
so a 90%-frozen model sends about a tenth of the bytes DDP would send.
"""

# No `from __future__ import annotations` here: DDP checks the hook's `bucket` annotation at runtime.
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def check_process_group(group: dist.ProcessGroup | None) -> None:
    """Raise unless ``group`` is None (the whole job) or a process group that this rank belongs to."""
    if group is None:
        return
    # dist.new_group hands ranks outside the group a placeholder int instead of a ProcessGroup.
    placeholder = isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
    if not placeholder and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if placeholder or dist.get_rank(group) < 0:
        raise ValueError(
            f"process_group does not contain this rank (global rank {dist.get_rank()}): only its members may "
            "construct a SlimFit on it"
        )


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when ``group`` (None: the whole job) has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def source_rank(group: dist.ProcessGroup | None = None) -> int:
    """Global rank of ``group``'s first member, whose choices every member follows (0 for the whole job)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def broadcast_indices(indices: list[int], group: dist.ProcessGroup | None = None) -> list[int]:
    """The list of ints of ``group``'s first rank on every member (unchanged when not running distributed)."""
    if not is_distributed(group):
        return indices
    payload = [indices]
    dist.broadcast_object_list(payload, src=source_rank(group), group=group)
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
