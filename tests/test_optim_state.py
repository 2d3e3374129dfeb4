"""Optimizer-state policies: keep, drop and offload as layers freeze and thaw."""

from functools import partial

import pytest
import torch
from torch import nn

from slimfit.core import SlimFit
from slimfit.optim_state import OptimizerStateManager

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def mlp(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)]).to(device)


def run(policy: str, steps: int, device: str = "cpu", make_opt=torch.optim.AdamW):
    """Train an MLP under SlimFit; returns (model, optimizer, slimfit, per-step trainable sets)."""
    model = mlp(device)
    opt = make_opt(model.parameters(), lr=1e-2)
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers", optimizer_state=policy, compression=None, seed=0)
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g).to(device)
        model(x).square().mean().backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        sets.append(sf.trainable_layers())
    return model, opt, sf, sets


def frozen_params(sf: SlimFit) -> list[torch.Tensor]:
    return [layer.param for layer in sf.layers if not layer.param.requires_grad]


def test_keep_preserves_state_of_frozen_layers():
    model, opt, sf, _ = run("keep", 4)  # warm-up (2 steps) done: every layer has state
    assert all(layer.param in opt.state for layer in sf.layers)
    frozen = frozen_params(sf)
    saved = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in frozen}
    x = torch.randn(16, 8)
    model(x).square().mean().backward()
    opt.step()
    for p in frozen:
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved[p].items())


def test_drop_frees_state_on_freeze_and_restarts_on_thaw():
    model, opt, sf, sets = run("drop", 6)
    assert all(p not in opt.state for p in frozen_params(sf))
    # A layer trained in the last step carries its state; one that just thawed has none until it steps.
    trainable = [layer.param for layer in sf.layers if layer.param.requires_grad]
    x = torch.randn(16, 8)
    fresh = [p for p in trainable if p not in opt.state]
    model(x).square().mean().backward()
    opt.step()
    assert all(int(opt.state[p]["step"]) == 1 for p in fresh)


MOMENTS = ("exp_avg", "exp_avg_sq")


def state_nbytes(opt: torch.optim.Optimizer, params: list[torch.Tensor], on_param_device: bool) -> int:
    """Bytes of the state tensors of ``params`` that are (or are not) on their parameter's device."""
    return sum(
        v.numel() * v.element_size()
        for p in params
        for v in opt.state[p].values()
        if isinstance(v, torch.Tensor) and (v.device == p.device) == on_param_device
    )


@pytest.mark.parametrize("device", DEVICES)
def test_offload_keeps_each_moment_where_it_belongs_and_reports_it(device):
    """Where each layer's Adam moments live under offload, after the warm-up (every layer has state).

    CPU parameters have nothing to offload to: every moment stays on the CPU in the very storage the optimizer
    updates (a freeze or thaw copies nothing) and memory_report counts it all as on-device state. CUDA parameters:
    a frozen layer's moments are in pinned host memory, a trainable layer's and every bias's on the GPU, and
    memory_report splits them so. Either way training equals keep's. (No emulated accelerator: autograd aborts the
    process on a fake device object that has no device guard, and meta tensors cannot do Adam's arithmetic; the
    device-generic copies themselves are unit-tested in tests/test_devices.py.)
    """
    keep_model, keep_opt, _, keep_sets = run("keep", 8, device)
    model, opt, sf, sets = run("offload", 8, device)
    report = sf.memory_report()  # first: it also waits for pending device-to-host copies before moments are read
    assert sets == keep_sets
    keep_params = dict(keep_model.named_parameters())
    params = dict(model.named_parameters())
    frozen = {id(p) for p in frozen_params(sf)}
    assert frozen and len(frozen) < len(sf.layers) and all(p in opt.state for p in params.values())
    for name, p in params.items():
        assert torch.equal(p, keep_params[name]), name
        for key in MOMENTS:
            moment, where = opt.state[p][key], f"{name} ({'frozen' if id(p) in frozen else 'trainable'}) {key}"
            assert torch.equal(moment.cpu(), keep_opt.state[keep_params[name]][key].cpu()), where
            if device == "cpu":
                assert moment.device.type == "cpu", where
            elif id(p) in frozen:
                assert moment.device.type == "cpu" and moment.is_pinned(), where
            else:
                assert moment.device == p.device, where

    everything = list(params.values())
    frozen_moments = sum(
        opt.state[p][k].numel() * opt.state[p][k].element_size() for p in frozen_params(sf) for k in MOMENTS
    )
    assert report["optimizer_state"] == state_nbytes(opt, everything, on_param_device=True) > 0
    if device == "cpu":
        assert report["optimizer_state_offloaded"] == 0
        assert report["optimizer_state"] == sum(state_nbytes(opt, everything, flag) for flag in (True, False))
    else:
        # The moments of frozen layers, plus at most Adam's scalar step counters, which torch keeps on the host.
        steps = sum(
            opt.state[p]["step"].element_size() for p in everything if opt.state[p]["step"].device.type == "cpu"
        )
        assert frozen_moments <= report["optimizer_state_offloaded"] <= frozen_moments + steps

    if device == "cpu":
        # Further steps freeze and thaw layers; every moment keeps its storage (nothing was copied anywhere).
        storage = {name: [opt.state[p][k].data_ptr() for k in MOMENTS] for name, p in params.items()}
        before, changed = sf.trainable_layers(), False
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(16, 8, generator=g)).square().mean().backward()
            opt.step()
            sf.step()
            opt.zero_grad()
            changed |= sf.trainable_layers() != before
            now = {name: [opt.state[p][k].data_ptr() for k in MOMENTS] for name, p in params.items()}
            assert now == storage, f"moments copied on the CPU: {[n for n in now if now[n] != storage[n]]}"
        assert changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_offload_moves_frozen_state_to_pinned_host_memory_and_back():
    model, opt, sf, _ = run("offload", 4, "cuda")
    for p in frozen_params(sf):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].device.type == "cpu" and opt.state[p][key].is_pinned()
    for p in (layer.param for layer in sf.layers if layer.param.requires_grad and layer.param in opt.state):
        assert opt.state[p]["exp_avg"].is_cuda
    report = sf.memory_report()
    assert report["optimizer_state_offloaded"] > 0 and report["cuda_max_memory_allocated"] > 0

    state = opt.state_dict()  # waits for the asynchronous copies
    opt.load_state_dict(state)  # puts everything on the device; SlimFit offloads the frozen layers again
    assert all(opt.state[p]["exp_avg"].device.type == "cpu" for p in frozen_params(sf))

    sf.remove()
    assert all(v.is_cuda for p in opt.state for k, v in opt.state[p].items() if k != "step")


def test_optimizer_reload_never_drops_loaded_state():
    """After optimizer.load_state_dict the trainable set may still be the pre-checkpoint one."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    manager = OptimizerStateManager(opt, "drop")
    manager.reload(list(model.parameters()))
    assert len(opt.state) == len(list(model.parameters()))


@pytest.mark.parametrize("make_opt", [partial(torch.optim.SGD, momentum=0.9), torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("policy", ["keep", "drop", "offload"])
def test_policies_work_with_other_optimizers(policy, make_opt):
    model, opt, sf, sets = run(policy, 6, make_opt=make_opt)
    assert all(len(s) == sf.num_trainable for s in sets)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if policy == "drop":
        assert all(p not in opt.state for p in frozen_params(sf))


def test_unknown_policy():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer_state must be one of \['offload', 'keep', 'drop'\], got 'x'"):
        OptimizerStateManager(opt, "x")
