"""Accelerators other than CUDA: RNG replay and optimizer-state offload go through torch's device-generic APIs.

No such accelerator exists here, so a fake one stands in: tensors that report device ``mps:0`` keep their data on
the CPU (:class:`OnFake`), a dispatch mode runs every op on the CPU and records what was asked of it, and the
accelerator's RNG, streams and events are monkeypatched. ``mps`` is used because torch needs no backend to build
such a device object (``xpu`` and ``mtia`` tensors would try to initialise their runtime).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from slimfit._extension import STATUS, has_kernel
from slimfit.nn._rng import replay, rng_state
from slimfit.optim_state import OptimizerStateManager

FAKE = torch.device("mps", 0)


class OnFake(torch.Tensor):
    """A tensor on the fake accelerator whose data is the CPU tensor ``cpu_data``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> OnFake:
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype, device=FAKE)
        t.cpu_data = data
        return t

    def __repr__(self) -> str:
        return f"OnFake({self.cpu_data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with FakeAccelerator():
            return func(*args, **(kwargs or {}))


class FakeAccelerator(TorchDispatchMode):
    """Runs ops on the CPU in place of the fake accelerator; ``calls`` records (op, pin_memory, non_blocking)."""

    calls: list[tuple[str, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        non_blocking = kwargs.get("non_blocking")
        if func is torch.ops.aten.copy_.default:
            non_blocking = len(args) > 2 and args[2]
        FakeAccelerator.calls.append((func.__name__, kwargs.pop("pin_memory", None), non_blocking))
        to_fake = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == FAKE.type
        if to_fake:
            kwargs["device"] = torch.device("cpu")
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        wrap = to_fake or (isinstance(first, OnFake) and "device" not in kwargs)
        args, kwargs = tree_map(lambda a: a.cpu_data if isinstance(a, OnFake) else a, (args, kwargs))
        out = func(*args, **kwargs)
        if func._schema.is_mutable:  # in-place: the destination object itself
            return first
        return tree_map(lambda o: OnFake(o) if wrap and isinstance(o, torch.Tensor) else o, out)


class FakeEvent:
    """Stands in for ``torch.Event``; remembers the device, the stream it was recorded on, and waits."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device, self.stream, self.waited = device, None, False

    def record(self, stream: Any = None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.waited = True


@pytest.fixture
def fake_accelerator(monkeypatch):
    """The fake ``mps`` device as torch's current accelerator, with streams and events that record their use."""
    events: list[FakeEvent] = []

    def event(device: torch.device | None = None) -> FakeEvent:
        events.append(FakeEvent(device))
        return events[-1]

    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: FAKE)
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    monkeypatch.setattr(torch, "Event", event)
    FakeAccelerator.calls = []
    return events


def offload_setup() -> tuple[nn.Parameter, torch.optim.Optimizer, torch.Tensor]:
    p = nn.Parameter(OnFake(torch.randn(4, 4)))
    optimizer = torch.optim.SGD([p], lr=0.1)
    moment = torch.randn(4, 4)
    optimizer.state[p] = {"exp_avg": OnFake(moment.clone()), "step": torch.tensor(3.0)}
    return p, optimizer, moment


def test_offload_pins_copies_asynchronously_and_waits_on_any_accelerator(fake_accelerator):
    with FakeAccelerator():
        p, optimizer, moment = offload_setup()
        manager = OptimizerStateManager(optimizer, "offload")
        FakeAccelerator.calls = []
        manager.freeze([p])
        host = optimizer.state[p]["exp_avg"]
        assert host.device.type == "cpu" and torch.equal(host, moment)
        assert ("empty.memory_format", True, None) in FakeAccelerator.calls  # pinned host buffer
        assert ("copy_.default", None, True) in FakeAccelerator.calls  # asynchronous copy into it
        [event] = fake_accelerator
        assert event.device == FAKE and event.stream == ("stream of", FAKE)
        manager.synchronize()
        assert event.waited

        manager.thaw([p])
        back = optimizer.state[p]["exp_avg"]
        assert back.device == FAKE and torch.equal(back.cpu_data, moment)
        assert ("_to_copy.default", None, True) in FakeAccelerator.calls


def test_offload_to_unpinnable_memory_is_synchronous_and_needs_no_event(fake_accelerator, monkeypatch):
    # A device that is not the current accelerator (torch only pins for that one) gets plain host memory.
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with FakeAccelerator():
        p, optimizer, moment = offload_setup()
        manager = OptimizerStateManager(optimizer, "offload")
        manager.freeze([p])
        assert torch.equal(optimizer.state[p]["exp_avg"], moment)
        assert ("copy_.default", None, False) in FakeAccelerator.calls
        assert not fake_accelerator
        manager.synchronize()


class FakeGenerators:
    """Per-device generator states of the fake accelerator, standing in for ``torch.mps``'s RNG functions."""

    def __init__(self) -> None:
        self.states: dict[torch.device, torch.Tensor] = {FAKE: torch.tensor([1, 2, 3], dtype=torch.uint8)}

    def get_rng_state(self, device: Any = "mps") -> torch.Tensor:
        return self.states[torch.device(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: Any = "mps") -> None:
        self.states[torch.device(device)] = state.clone()


@pytest.fixture
def fake_generators(monkeypatch) -> FakeGenerators:
    generators = FakeGenerators()
    monkeypatch.setattr(torch.mps, "get_rng_state", generators.get_rng_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", generators.set_rng_state)
    return generators


def test_rng_replay_uses_the_accelerators_own_generator(fake_generators):
    saved = rng_state(FAKE)
    assert saved.tolist() == [1, 2, 3]
    fake_generators.states[FAKE] = torch.tensor([9], dtype=torch.uint8)  # forward went on drawing
    cpu_before = torch.get_rng_state()
    with replay(FAKE, saved):
        assert fake_generators.states[FAKE].tolist() == [1, 2, 3]
        fake_generators.states[FAKE] = torch.tensor([7], dtype=torch.uint8)  # backward draws
    assert fake_generators.states[FAKE].tolist() == [9]
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_rng_replay_on_cpu_restores_the_generator():
    saved = rng_state(torch.device("cpu"))
    first = torch.rand(3)
    with replay(torch.device("cpu"), saved):
        assert torch.equal(torch.rand(3), first)
    assert not torch.equal(torch.rand(3), first)


def test_rng_replay_refuses_a_device_without_a_generator_module():
    with pytest.raises(ValueError, match=r"RNG replay needs .* got device meta"):
        rng_state(torch.device("meta"))


@pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")
def test_update_norms_op_refuses_pairs_on_different_devices():
    before, after = [torch.randn(3), torch.randn(5)], [torch.randn(3), torch.randn(5, device="meta")]
    # Called directly, a meta tensor sends the op to its fake kernel, which must refuse rather than invent a result.
    with pytest.raises(ValueError, match=r"after\[1\] must be on the device of before\[0\] \(cpu\), got meta"):
        torch.ops.slimfit.update_norms(before, after, "rel_l2", 1e-12)
    if has_kernel("update_norms", "CPU"):  # straight into the kernel, as the dispatcher sends CUDA a host tensor
        cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        with pytest.raises(
            RuntimeError,
            match=r"slimfit::update_norms: after\[1\] must be on the device of before\[0\] \(cpu\), got meta",
        ):
            torch.ops.slimfit.update_norms.default.redispatch(cpu_kernel, before, after, "rel_l2", 1e-12)
