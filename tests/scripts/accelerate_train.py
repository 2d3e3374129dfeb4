"""Trains a small model under SlimFit with `accelerate launch`; each rank saves its weights and schedule."""

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

import slimfit

STEPS = 6


def main(out: str) -> None:
    # DDP must see every parameter requiring grad when it is built, and must tolerate frozen ones later.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(0)
    # Layers of 256, 32, 256 and 24 elements: half of them (284) holds one 256-element weight at a time.
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.Linear(8, 3)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS, 8, 8, generator=g), torch.randint(0, 3, (STEPS, 8), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(1000 + accelerator.process_index)  # ranks' RNGs differ on purpose
    sf = slimfit.SlimFit(model, optimizer, freeze_ratio=0.5, compression=None)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    schedule = []
    for step in range(STEPS):
        schedule.append(sf.trainable_layers())
        loss = torch.nn.functional.cross_entropy(model(x[step, local]), y[step, local])
        accelerator.backward(loss)
        optimizer.step()
        sf.step()
        optimizer.zero_grad()
    weights = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    torch.save({"schedule": schedule, "weights": weights}, f"{out}.{rank}")
    # Skip interpreter teardown: destroying DDP's reducer and gloo's process group at exit intermittently
    # deadlocks or aborts ("terminate called without an active exception"), a torch issue outside this test.
    accelerator.wait_for_everyone()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
