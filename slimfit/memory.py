"""Memory accounting: measured bytes held for backward, plus bytes by category.

The saved-activation numbers here are *measured*: :class:`SavedTensorMeter` installs
``torch.autograd.graph.saved_tensors_hooks`` and sees every tensor the autograd graph keeps for backward
(built-in ops and ``ctx.save_for_backward`` alike). A tensor counts while the graph still holds it, once per
storage (views of one buffer count once, at the full storage size), and never when it is a parameter or shares
storage with one (weights are counted under "weights", not twice).

Typical use::

    with SavedTensorMeter(model) as meter:
        loss = model(**batch).loss
    print(meter.live_bytes)        # bytes the graph holds for backward right now
    loss.backward()                 # meter.live_bytes drops to 0 once the graph is freed
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "SavedTensorMeter",
    "DecodeMeter",
    "DecodeProfile",
    "note_decoded",
    "measure_saved_bytes",
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "cuda_peak_bytes",
]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class _Entry:
    ref: weakref.ref  # the detached alias handed to autograd; dead once the graph drops it
    key: tuple[str, int]
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class SavedTensorMeter:
    """Context manager that measures the tensors saved for backward by code run inside it.

    Args:
        exclude: a module (its parameters) or an iterable of tensors whose storages are not counted.
            ``nn.Parameter`` objects are always excluded.

    Attributes read after (or during) the ``with`` block:
        live_bytes: bytes of distinct storages the autograd graph still holds (drops as the graph is freed).
        peak_bytes: the largest ``live_bytes`` seen when a tensor was saved inside the block.

    Every saved tensor is handed to autograd as a detached alias of itself (same storage, no copy), so the
    meter changes neither results nor memory; only one pair of saved-tensor hooks may be active at a time,
    which is why meters do not nest.
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
        if isinstance(exclude, nn.Module):
            tensors = list(exclude.parameters())
        elif exclude is None:
            tensors = []
        else:
            tensors = list(exclude)
            bad = [type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)]
            if bad:
                raise TypeError(f"exclude must be an nn.Module or an iterable of tensors, got items of type {bad[0]}")
        self._excluded = {_storage_key(t) for t in tensors}
        self._entries: list[_Entry] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.peak_bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or t.device.type == "meta":
            return t
        key = _storage_key(t)
        if key in self._excluded:
            return t
        alias = t.detach()
        self._entries.append(_Entry(weakref.ref(alias), key, _storage_nbytes(t), tuple(t.shape), t.dtype))
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return alias

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _live(self) -> list[_Entry]:
        self._entries = [e for e in self._entries if e.ref() is not None]
        return self._entries

    @property
    def live_bytes(self) -> int:
        """Bytes (distinct storages) the autograd graph currently holds from inside this meter."""
        seen: dict[tuple[str, int], int] = {}
        for e in self._live():
            seen[e.key] = max(seen.get(e.key, 0), e.nbytes)
        return sum(seen.values())

    def live_by_shape(self) -> dict[tuple[tuple[int, ...], torch.dtype], int]:
        """Live bytes grouped by (shape, dtype) of the saved tensor, largest first; for finding what dominates.

        A storage saved through several views counts once, under the first view seen.
        """
        groups: dict[tuple[tuple[int, ...], torch.dtype], int] = {}
        seen: set[tuple[str, int]] = set()
        for e in self._live():
            if e.key in seen:
                continue
            seen.add(e.key)
            groups[(e.shape, e.dtype)] = groups.get((e.shape, e.dtype), 0) + e.nbytes
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))

    def __enter__(self) -> SavedTensorMeter:
        if self._hooks is not None:
            raise RuntimeError("SavedTensorMeter is already active; create a new meter instead of re-entering")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


@dataclass
class DecodeProfile:
    """What backward had decoded at each moment, in a form that scales to larger batches.

    A moment is ``(grows, chunks)``: the live decoded bytes that grow in proportion to the examples in a batch,
    and the ``(bytes, cap)`` of each live chunk of a chunked decode, which grows only up to its chunk's bytes.
    Moments seen more than once are kept once.
    """

    moments: set[tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=set)

    def peak(self, scale: int = 1) -> int:
        """The most bytes decoded at once with ``scale`` times the examples of the batches profiled."""
        return max(
            (scale * grows + sum(min(scale * n, max(cap, n)) for n, cap in chunks) for grows, chunks in self.moments),
            default=0,
        )


class DecodeMeter:
    """Context manager: the most bytes of compressed activations decoded by backward that are alive at once
    (compression temporaries), which the saved-tensor meter cannot see.

    slimfit's backward Functions report every tensor they decode from a code (dequantized or densified activations,
    unpacked masks, and the derivative code's chunks: code, indices, looked-up derivatives) through
    :func:`note_decoded`. Each counts, once per storage, from then until its storage is freed (a weak reference
    tells); ``peak_bytes`` is the largest sum alive together. Tensors computed from them (casts, products) are not
    counted. With ``profile``, every moment is also added to it (see :class:`DecodeProfile`). Meters do not nest.
    """

    def __init__(self, profile: DecodeProfile | None = None) -> None:
        self.peak_bytes = 0
        self.profile = profile
        self._live: dict[tuple[str, int], tuple[int, int | None]] = {}

    def __enter__(self) -> DecodeMeter:
        global _DECODE_METER
        if _DECODE_METER is not None:
            raise RuntimeError("a DecodeMeter is already active; meters do not nest")
        _DECODE_METER = self
        return self

    def __exit__(self, *exc) -> None:
        global _DECODE_METER
        _DECODE_METER = None

    def _add(self, t: torch.Tensor, chunk: int | None) -> None:
        key = _storage_key(t)
        if key in self._live:
            return
        storage = t.untyped_storage()
        self._live[key] = (storage.nbytes(), None if chunk is None else chunk * t.element_size())
        weakref.finalize(storage, self._live.pop, key, None)
        self.peak_bytes = max(self.peak_bytes, sum(n for n, _ in self._live.values()))
        if self.profile is not None:
            grows = sum(n for n, cap in self._live.values() if cap is None)
            chunks = tuple(sorted((n, cap) for n, cap in self._live.values() if cap is not None))
            self.profile.moments.add((grows, chunks))


_DECODE_METER: DecodeMeter | None = None


def note_decoded(t: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Report a tensor decoded in backward to the active :class:`DecodeMeter` (if any); returns ``t``.

    ``chunk``: ``t`` is one chunk of a decode done ``chunk`` elements at a time (so it never grows beyond that)."""
    if _DECODE_METER is not None:
        _DECODE_METER._add(t, chunk)
    return t


def measure_saved_bytes(fn: Callable[[], object], exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> int:
    """Run ``fn()`` (typically a forward pass) and return the bytes its autograd graph holds for backward.

    The result of ``fn`` is kept alive until the count is taken, then released (with its graph).
    """
    with SavedTensorMeter(exclude) as meter:
        result = fn()
    live = meter.live_bytes
    del result
    return live


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters of ``model`` (each storage once)."""
    return _distinct_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently allocated for ``model``'s parameters."""
    return _distinct_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device: torch.device | str | None = None) -> int:
    """Bytes of tensors in ``optimizer.state`` (e.g. Adam moments), optionally only those on ``device``."""
    tensors = (v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    if device is not None:
        dev = torch.device(device)
        tensors = (t for t in tensors if t.device.type == dev.type and (dev.index is None or t.device == dev))
    return _distinct_bytes(tensors)


def cuda_peak_bytes(device: torch.device | str | int | None = None) -> int | None:
    """``torch.cuda.max_memory_allocated`` in bytes, or None when CUDA is not available."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        seen[_storage_key(t)] = _storage_nbytes(t)
    return sum(seen.values())
