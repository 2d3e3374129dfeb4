"""Two-process DDP on gloo: frozen layers cost no gradient traffic and training matches one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from slimfit.distributed import broadcast_indices, register_trainable_only_hook

WORLD = 2
STEPS = 4


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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
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
    finally:
        dist.destroy_process_group()


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
