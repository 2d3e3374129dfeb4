"""What each patched site keeps for backward: :class:`CompressionPolicy` and its per-site settings.

A site setting of ``None`` keeps that site exact (it saves what PyTorch would save). Passing ``policy=None`` to
:func:`slimfit.models.patch` leaves the model untouched, so results are bit-identical to the unpatched model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["Quantize", "TopK", "DerivativeCode", "CompressionPolicy", "DEFAULT_POLICY"]


@dataclass(frozen=True)
class Quantize:
    """Per-group min/max quantization (:func:`slimfit.ops.quantize`).

    bits: code width in {2, 4, 8}; group_size: elements sharing one bf16 scale and offset (4 bytes per group);
    stochastic: unbiased stochastic rounding instead of round-to-nearest.
    """

    bits: int = 8
    group_size: int = 128
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"Quantize.bits must be one of [2, 4, 8], got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
            raise ValueError(f"Quantize.group_size must be a positive int, got {self.group_size!r}")


@dataclass(frozen=True)
class TopK:
    """Keep the ``keep`` fraction of entries with the largest magnitude per row (last dim), drop the rest."""

    keep: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"TopK.keep must be in (0, 1], got {self.keep!r}")


@dataclass(frozen=True)
class DerivativeCode:
    """Store a ``bits``-bit code of the activation's derivative (Few-Bit Backward) instead of its input.

    The derivative is replaced by the nearest of ``2**bits`` levels fitted (Lloyd-Max) to its distribution under
    a standard-normal input, so backward is one table look-up per element.
    """

    bits: int = 2

    def __post_init__(self) -> None:
        if self.bits not in (1, 2, 3, 4):
            raise ValueError(f"DerivativeCode.bits must be one of [1, 2, 3, 4], got {self.bits!r}")


DropoutMode = Literal["packed", "replay"]


@dataclass(frozen=True)
class CompressionPolicy:
    """Per-site settings; ``None`` for a site means "exact" (save what PyTorch saves).

    activation: pointwise activations (GELU family, ReLU, SiLU, Tanh, Sigmoid). ``DerivativeCode(bits)`` or
        ``Quantize`` of the input.
    layernorm_frozen: LayerNorm or RMSNorm whose weight does not train; only dx is needed, from the normalised
        output (``TopK`` sparsified or ``Quantize``d) plus the per-row 1/std or 1/rms (exact, 4 bytes per row).
    layernorm_trainable: LayerNorm or RMSNorm whose weight trains; the normalised output, ``Quantize``d.
    linear_input: input of a Linear whose weight trains (a frozen weight saves nothing about its input).
        One code is stored when several Linears read the same tensor (Q/K/V).
    attention: q, k and v of scaled-dot-product attention; the output is recomputed in backward, the
        L x L matrix is never stored.
    dropout: ``"packed"`` keeps the mask at 1 bit per element; ``"replay"`` keeps only the RNG state and
        regenerates the mask in backward. Attention-probability dropout always uses RNG replay.
    gated_mlp: ``act(gate) * up`` of Llama-style gated MLPs; gate and up are kept ``Quantize``d and act, act'
        recomputed from them.
    lm_head_chunk: a causal LM given labels in training computes its head and loss this many tokens at a time
        (:func:`slimfit.nn.lm_head.linear_cross_entropy`), never keeping the N x V logits, and returns
        ``logits=None``; the hidden states are kept exact, or coded by ``linear_input`` when only the head's weight
        needs a gradient. None computes the full logits as the model does.
    """

    activation: DerivativeCode | Quantize | None = DerivativeCode(4)
    layernorm_frozen: TopK | Quantize | None = Quantize(8)
    layernorm_trainable: Quantize | None = Quantize(8)
    linear_input: Quantize | None = Quantize(8)
    attention: Quantize | None = Quantize(8)
    dropout: DropoutMode | None = "packed"
    gated_mlp: Quantize | None = Quantize(8)
    lm_head_chunk: int | None = 1024

    def __post_init__(self) -> None:
        _check("activation", self.activation, (DerivativeCode, Quantize))
        _check("layernorm_frozen", self.layernorm_frozen, (TopK, Quantize))
        _check("layernorm_trainable", self.layernorm_trainable, (Quantize,))
        _check("linear_input", self.linear_input, (Quantize,))
        _check("attention", self.attention, (Quantize,))
        _check("gated_mlp", self.gated_mlp, (Quantize,))
        if self.dropout not in (None, "packed", "replay"):
            raise ValueError(f"dropout must be one of [None, 'packed', 'replay'], got {self.dropout!r}")
        chunk = self.lm_head_chunk
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ValueError(f"lm_head_chunk must be None or a positive int, got {chunk!r}")

    def with_bits(self, bits: int) -> CompressionPolicy:
        """This policy with every ``Quantize`` site coding in ``bits`` bits (2, 4 or 8); other sites unchanged."""
        changed = {
            site.name: dataclasses.replace(value, bits=bits)
            for site in dataclasses.fields(self)
            if isinstance(value := getattr(self, site.name), Quantize)
        }
        return dataclasses.replace(self, **changed)

    @classmethod
    def exact(cls) -> CompressionPolicy:
        """Every site patched but saving exact tensors: same numbers as PyTorch (used to test the Functions)."""
        return cls(None, None, None, None, None, None, None)


def _check(name: str, value: object, accepted: tuple[type, ...]) -> None:
    if value is not None and not isinstance(value, accepted):
        names = ", ".join(t.__name__ for t in accepted)
        raise ValueError(f"{name} must be None or one of [{names}], got {value!r}")


DEFAULT_POLICY = CompressionPolicy()
