"""DDP on gloo (2 processes, 4 for sub-groups): no gradient traffic for frozen layers, training as in one process."""

import contextlib
import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from slimfit.distributed import broadcast_indices, register_trainable_only_hook

WORLD = 2
# A rank that never arrives (e.g. a port taken between free_port() and bind) fails fast instead of hanging.
GROUP_TIMEOUT = datetime.timedelta(minutes=2)
STEPS = 4


@contextlib.contextmanager
def ddp_worker_group(rank: int, port: int, world: int = WORLD) -> Iterator[None]:
    """A gloo group of ``world`` ranks around a worker's body; the worker process ends with the block.

    A body that returns (its results saved) exits without interpreter teardown: destroying DDP's reducer can
    deadlock gloo's teardown (its destructor joins gloo's worker thread while holding the GIL that thread is
    waiting for), an intermittent torch issue unrelated to what these tests check. A body that raises only
    destroys the group, so the error reaches the parent.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 2 * WORLD, 8, generator=g), torch.randint(0, 3, (STEPS, 2 * WORLD), generator=g)


def frozen_at(step: int) -> set[str]:
    return {"0.weight", "2.weight"} if step % 2 == 0 else {"3.weight", "0.bias"}


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(zip(names, model.parameters(), strict=True))
    for step in range(STEPS):
        for name, p in params.items():
            p.requires_grad_(name not in frozen_at(step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()


def ddp_worker(rank: int, port: int, out: str) -> None:
    with ddp_worker_group(rank, port):
        torch.manual_seed(100 + rank)  # ranks' RNGs differ on purpose
        assert broadcast_indices([rank, 7]) == [0, 7]
        model = make_model()
        names = [n for n, _ in model.named_parameters()]
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        register_trainable_only_hook(ddp)
        x, y = make_data()
        local = slice(rank * 2, rank * 2 + 2)
        train(ddp, x[:, local], y[:, local], names)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}.{rank}")


def test_trainable_only_hook_matches_single_process(tmp_path):
    out = str(tmp_path / "weights")
    mp.start_processes(ddp_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    single = make_model()
    x, y = make_data()
    train(single, x, y, [n for n, _ in single.named_parameters()])
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-5, atol=1e-6)


def test_hook_rejects_a_plain_module():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_trainable_only_hook(torch.nn.Linear(2, 2))


def test_slimfit_under_accelerate_launch_agrees_across_ranks(tmp_path):
    out = str(tmp_path / "rank")
    script = Path(__file__).parent / "scripts" / "accelerate_train.py"
    # `--multi_gpu` selects accelerate's torchrun launcher; the script's Accelerator(cpu=True) then runs gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--multi_gpu",
        "--main_process_port",
        str(free_port()),
        str(script),
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert rank0["schedule"] == rank1["schedule"]
    assert len({tuple(s) for s in rank0["schedule"]}) > 1  # the schedule really changed
    for name, w in rank0["weights"].items():
        torch.testing.assert_close(w, rank1["weights"][name], rtol=0, atol=0)


def fsdp_worker(rank: int, port: int, out: str, version: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1, timeout=GROUP_TIMEOUT)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

        import slimfit

        model = make_model()
        if version == 1:
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
        else:
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        try:
            slimfit.SlimFit(model, torch.optim.AdamW(model.parameters()), compression=None)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        Path(out).write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("version", "named"), [(1, "FullyShardedDataParallel module(s) (first: '<model>')"), (2, "DTensor parameter(s)")]
)
def test_fsdp_is_refused_with_a_clear_error(tmp_path, version, named):
    out = tmp_path / "message"
    mp.start_processes(fsdp_worker, args=(free_port(), str(out), version), nprocs=1, start_method="spawn")
    message = out.read_text()
    assert named in message and "FSDP2 (fully_shard)" in message and "DistributedDataParallel" in message, message


def train_slimfit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int | None = 5,
    freeze_ratio: float = 0.4,
    **kwargs: Any,
) -> list[list[str]]:
    """SlimFit's README loop with plain SGD; returns the trainable set of every step."""
    import slimfit

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sf = slimfit.SlimFit(model, opt, freeze_ratio=freeze_ratio, compression=None, seed=seed, **kwargs)
    sets = []
    for step in range(STEPS):
        sets.append(sf.trainable_layers())
        torch.nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
        sf.step()
        opt.zero_grad()
    return sets


def slimfit_ddp_worker(rank: int, port: int, out: str, options: dict[str, Any]) -> None:
    with ddp_worker_group(rank, port):
        model = make_model()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        register_trainable_only_hook(ddp)
        torch.manual_seed(100 + rank)  # ranks' RNGs differ on purpose
        x, y = make_data()
        local = slice(rank * 2, rank * 2 + 2)
        sets = train_slimfit(ddp, x[:, local], y[:, local], **options)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"sets": sets, "weights": weights}, f"{out}.{rank}")


# By parameters (the default): the three Linears hold 128, 256 and 48 elements, a budget of 259 takes 256 alone or
# 128 + 48 (no layer is 1/8 of the largest). At 0.2 with a small-layer share of 1/4, the budget of 346 keeps 48 at
# every step and adds 256 or 128.
@pytest.mark.parametrize(
    "options",
    [
        {"revisit_rounds": None},
        {},
        {"revisit_rounds": 1},
        {"freeze_unit": "layers"},
        {"freeze_ratio": 0.2, "small_layer_share": 0.25},
    ],
)
def test_slimfit_under_ddp_matches_one_process_with_the_global_batch(tmp_path, options):
    out = str(tmp_path / "slimfit")
    mp.start_processes(slimfit_ddp_worker, args=(free_port(), out, options), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    single = make_model()
    x, y = make_data()
    sets = train_slimfit(single, x, y, **options)
    assert ranks[0]["sets"] == ranks[1]["sets"] == sets
    assert len({tuple(s) for s in sets}) > 1
    if "small_layer_share" in options:  # the small layer trains at every step; packed by score it does not
        assert all("3.weight" in s for s in sets)
    elif not options:
        assert not all("3.weight" in s for s in sets)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["weights"][name], p.detach(), rtol=1e-5, atol=1e-6)


# Two data-parallel jobs in one 4-process world, each on its own sub-group: ranks 0 and 1 train one model, 2 and 3
# another, each rank on one of its group's two samples.
SUBGROUPS = ([0, 1], [2, 3])


def subgroup_worker(rank: int, port: int, out: str) -> None:
    with ddp_worker_group(rank, port, world=4):
        groups = [dist.new_group(ranks) for ranks in SUBGROUPS]  # every rank creates every group, in order
        members = next(ranks for ranks in SUBGROUPS if rank in ranks)
        group = groups[SUBGROUPS.index(members)]
        assert broadcast_indices([rank, 7], group) == [members[0], 7]
        other = groups[1 - SUBGROUPS.index(members)]
        with pytest.raises(ValueError, match=rf"process_group does not contain this rank \(global rank {rank}\)"):
            train_slimfit(make_model(), *make_data(), process_group=other)
        model = make_model()
        ddp = DistributedDataParallel(model, find_unused_parameters=True, process_group=group)
        register_trainable_only_hook(ddp, group)
        torch.manual_seed(100 + rank)  # ranks' RNGs differ on purpose: the group's first rank's seed must rule
        x, y = make_data()
        sets = train_slimfit(ddp, x[:, rank : rank + 1], y[:, rank : rank + 1], seed=None, process_group=group)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"sets": sets, "weights": weights}, f"{out}.{rank}")


def test_slimfit_on_sub_groups_trains_each_like_one_process(tmp_path):
    out = str(tmp_path / "subgroup")
    mp.start_processes(subgroup_worker, args=(free_port(), out), nprocs=4, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(4)]
    x, y = make_data()
    for first, second in SUBGROUPS:
        single = make_model()
        torch.manual_seed(100 + first)
        sets = train_slimfit(single, x[:, first : second + 1], y[:, first : second + 1], seed=None)
        assert ranks[first]["sets"] == ranks[second]["sets"] == sets
        for name, p in single.named_parameters():
            torch.testing.assert_close(ranks[first]["weights"][name], ranks[second]["weights"][name], rtol=0, atol=0)
            torch.testing.assert_close(ranks[first]["weights"][name], p.detach(), rtol=1e-5, atol=1e-6)
    assert ranks[0]["sets"] != ranks[2]["sets"]  # different seeds: the groups really scheduled independently


def test_process_group_must_be_a_process_group():
    import slimfit

    model = make_model()
    with pytest.raises(ValueError, match="process_group must be a torch.distributed.ProcessGroup or None, got str"):
        slimfit.SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), process_group="world")
