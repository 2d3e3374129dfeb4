"""Linear layers whose weight is held as blocks of input columns, each a parameter SlimFit schedules on its own.

A block's weight gradient needs only its own input columns (``dW[:, C] = dY^T X[:, C]``), so a step that trains
a few blocks of a matrix keeps only those columns of its input for backward, and a per-step budget counted in
parameters can spend itself on parts of matrices larger than the budget. :func:`split_columns` swaps a model's
``nn.Linear`` modules for :class:`ColumnBlockLinear` before the optimizer is built; state dicts keep the plain
``weight`` key both ways, so checkpoints load into the unsplit model and back, and :func:`merge_columns` undoes
the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, load, save
from slimfit.nn.linear import shared_code
from slimfit.policy import Quantize


def column_bounds(in_features: int, blocks: int) -> tuple[tuple[int, int], ...]:
    """``blocks`` contiguous column ranges covering ``in_features``, their widths differing by at most one."""
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= in_features:
        raise ValueError(f"blocks must be an int in [1, {in_features}] (the input width), got {blocks!r}")
    edges = [round(g * in_features / blocks) for g in range(blocks + 1)]
    return tuple(zip(edges[:-1], edges[1:], strict=True))


class ColumnBlockFunction(torch.autograd.Function):
    """``y = x @ cat(blocks, 1)^T + b``, keeping ``x``'s columns (coded by ``setting``) only for the blocks that train.

    Shapes: x ``[..., in]``, block g ``[out, e_g - s_g]`` for ``bounds[g] = (s_g, e_g)``, bias ``[out]`` or None.
    The blocks themselves (parameters, no extra memory) are kept for the input's gradient.
    """

    @staticmethod
    def forward(ctx, x, bias, bounds, setting: Quantize | None, *blocks):
        need_x = ctx.needs_input_grad[0]
        trained = [g for g in range(len(blocks)) if ctx.needs_input_grad[4 + g]]
        codes = [shared_code(x, setting, bounds[g]) for g in trained]
        save(ctx, *(blocks if need_x else ()), *codes)
        ctx.trained, ctx.num_blocks, ctx.x_dtype = trained, len(blocks), x.dtype
        return F.linear(x, torch.cat(blocks, 1), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        items = load(ctx)
        need_x, need_b = ctx.needs_input_grad[:2]
        blocks, codes = (items[: ctx.num_blocks], items[ctx.num_blocks :]) if need_x else ((), items)
        dx = (grad @ torch.cat(blocks, 1).to(grad.dtype)).to(ctx.x_dtype) if need_x else None
        g2 = grad.reshape(-1, grad.shape[-1])
        db = g2.sum(0) if need_b else None
        d_blocks: list[torch.Tensor | None] = [None] * ctx.num_blocks
        for g, code in zip(ctx.trained, codes, strict=True):
            x = decode(code)
            d_blocks[g] = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
        return (dx, db, None, None, *d_blocks)


def column_block_linear(
    x: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    bounds: Sequence[tuple[int, int]],
    bias: torch.Tensor | None,
    setting: Quantize | None,
) -> torch.Tensor:
    """``F.linear(x, cat(blocks, 1), bias)`` keeping for backward only the input columns of blocks that train."""
    if not torch.is_grad_enabled():
        return F.linear(x, torch.cat(tuple(blocks), 1), bias)
    return ColumnBlockFunction.apply(x, bias, tuple(bounds), setting, *blocks)


class ColumnBlockLinear(nn.Module):
    """``nn.Linear`` whose weight is the column blocks ``weight_blocks`` (parameters ``[out, width]``).

    ``weight`` is their concatenation, a new tensor (read it, do not assign to it). ``state_dict`` writes it
    under the plain ``weight`` key and ``load_state_dict`` accepts that key (or the blocks' own), so a
    checkpoint is interchangeable with the unsplit ``nn.Linear``'s.
    """

    def __init__(self, linear: nn.Linear, blocks: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bounds = column_bounds(linear.in_features, blocks)
        weight = linear.weight.detach()
        self.weight_blocks = nn.ParameterList(
            nn.Parameter(weight[:, s:e].clone(), requires_grad=linear.weight.requires_grad) for s, e in self.bounds
        )
        self.bias = linear.bias  # the same parameter: nothing to copy
        self.register_state_dict_post_hook(_merge_state)
        self.register_load_state_dict_pre_hook(_split_state)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(tuple(self.weight_blocks), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_block_linear(x, tuple(self.weight_blocks), self.bounds, self.bias, None)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with this module's weight (one tensor again) and bias (the same parameter)."""
        blocks = tuple(self.weight_blocks)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.weight.detach(), requires_grad=any(b.requires_grad for b in blocks))
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        widths = ", ".join(str(e - s) for s, e in self.bounds)
        return f"in_features={self.in_features}, out_features={self.out_features}, column_blocks=({widths})"


def _merge_state(module: ColumnBlockLinear, state: dict, prefix: str, _metadata) -> None:
    blocks = [state.pop(f"{prefix}weight_blocks.{g}") for g in range(len(module.bounds))]
    state[f"{prefix}weight"] = torch.cat([b.detach() for b in blocks], 1)


def _split_state(module: ColumnBlockLinear, state: dict, prefix: str, *_args) -> None:
    weight = state.pop(f"{prefix}weight", None)
    if weight is not None:
        for g, (s, e) in enumerate(module.bounds):
            state[f"{prefix}weight_blocks.{g}"] = weight[:, s:e]


def splittable_linears(model: nn.Module, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` of every ``nn.Linear`` of ``model`` that :func:`split_columns` may split, whatever
    its width: not under a name in ``exclude``, its weight shared with no other module (tied heads), and not a
    language model's output embedding (``get_output_embeddings()``: SlimFit's chunked LM head needs it whole, or
    the run keeps the full logits)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    output_embedding = getattr(model, "get_output_embeddings", lambda: None)()
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and not any(name == x or name.startswith(f"{x}.") for x in exclude)
        and owners[id(m.weight)] == 1
        and m is not output_embedding
    ]


def split_columns(model: nn.Module, blocks: int, exclude: Sequence[str] = ()) -> list[str]:
    """Replace every :func:`splittable_linears` module at least ``blocks`` columns wide by a
    :class:`ColumnBlockLinear` of ``blocks`` column blocks.

    Call it before building the optimizer (it gets the blocks as parameters) and before attaching SlimFit or
    wrapping the model (DDP, accelerate); ``exclude`` names modules to leave whole (e.g. a new head, which trains
    whole anyway). Returns the names of the modules replaced.
    """
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 2:
        raise ValueError(f"blocks must be an int of at least 2, got {blocks!r}")
    targets = [(name, m) for name, m in splittable_linears(model, exclude) if m.in_features >= blocks]
    for name, m in targets:
        _replace(model, name, ColumnBlockLinear(m, blocks))
    return [name for name, _ in targets]


def merge_columns(model: nn.Module) -> list[str]:
    """Undo :func:`split_columns`: every :class:`ColumnBlockLinear` becomes an ``nn.Linear`` again (same values)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, ColumnBlockLinear)]
    for name, m in targets:
        _replace(model, name, m.to_linear())
    return [name for name, _ in targets]


def whole_sizes(model: nn.Module) -> dict[int, int]:
    """``id(block) -> elements of its whole matrix`` for the column blocks in ``model``."""
    return {
        id(p): m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, ColumnBlockLinear)
        for p in m.weight_blocks
    }


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
