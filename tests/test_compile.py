"""torch.compile of a model under SlimFit: same training as eager, no graph breaks in the compressed modules,
and recompilations bounded by the number of distinct trainable states rather than growing with the steps.

Why recompiles happen at all: Dynamo guards on every parameter's ``requires_grad`` (it decides which
gradients the compiled backward computes), so each new trainable set is a new graph. Graphs are cached per
set, so a set seen before costs nothing. Compiling per block (``block.compile()``, "regional compilation")
keys the cache on a block's own state instead of the whole model's: identical blocks share one code object,
and a block whose layers are all frozen is the same state in every block. ``backend="aot_eager"`` runs
AOTAutograd, so the slimfit custom ops are traced through their fake kernels, without inductor's C++ build.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import transformers
from torch import nn
from torch._dynamo.utils import counters

from slimfit.core import SlimFit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """A pre-norm transformer-style FFN block made of the module types SlimFit compresses."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int = 3, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).squeeze(-1)


def data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        out.append((x, x[:, 0] * x[:, 1] - x[:, 2]))
    return out


def run(compile_mode: str | None, steps: int, freeze_ratio: float = 0.5) -> tuple[list[float], set, set, SlimFit]:
    """Train Net under SlimFit (default compression).

    Returns the losses, the distinct per-block states and whole-model trainable sets seen, and the facade.
    """
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sf = SlimFit(net, opt, freeze_ratio=freeze_ratio, seed=0)
    model: nn.Module = net
    if compile_mode == "model":
        model = torch.compile(net, backend="aot_eager")
    elif compile_mode == "blocks":
        for block in net.blocks:
            block.compile(backend="aot_eager")
    losses, states, sets = [], set(), set()
    for x, y in data(steps):
        states |= {block_state(net, i) for i in range(len(net.blocks))}
        sets.add(tuple(sf.trainable_layers()))
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, states, sets, sf


def block_state(net: Net, i: int) -> tuple:
    """What a compiled block's guards see: its parameters' requires_grad and whether its input needs grad."""
    below = [net.inp, *net.blocks[:i]]
    input_grad = any(p.requires_grad for m in below for p in m.parameters())
    return (input_grad, *(p.requires_grad for p in net.blocks[i].parameters()))


def graph_count() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_model_trains_like_eager_without_graph_breaks():
    eager, _, _, eager_sf = run(None, 8)
    compiled, _, sets, sf = run("model", 8)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert sf.trainable_layers() == eager_sf.trainable_layers()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph per distinct trainable set; a set seen again reuses its graph.
    assert 1 <= graph_count() <= len(sets)


def test_regional_compilation_bounds_recompiles_by_distinct_block_states():
    steps = 16
    eager, *_ = run(None, steps)
    # Enough cache entries for every state a block can be in here; beyond the limit Dynamo would fall back
    # to eager for new states (still correct, just not compiled).
    torch._dynamo.config.recompile_limit, limit = 64, torch._dynamo.config.recompile_limit
    try:
        compiled, states, sets, _ = run("blocks", steps)
    finally:
        torch._dynamo.config.recompile_limit = limit
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0
    # Graphs are shared between blocks and across steps: at most one per distinct block state, however long
    # the run (3 blocks x 16 steps = 48 block calls), and fewer than whole-model compilation's distinct sets.
    assert graph_count() <= len(states) < len(sets)


def test_fixed_trainable_set_compiles_once():
    """With nothing to schedule (every layer trains) there is exactly one graph and no recompile."""
    run("model", 4, freeze_ratio=0.0)
    assert graph_count() == 1
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0


def test_compiled_tiny_bert_trains_like_eager():
    """A Hugging Face BERT under SlimFit compiles and trains like eager. Compressed attention is the one
    graph break (its backward recomputes SDPA under ``torch.autograd.grad``), so it runs eagerly."""

    def bert_losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=8,
            num_labels=2,
            hidden_dropout_prob=0.0,  # compiled RNG draws differ from eager's; keep the comparison exact
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertForSequenceClassification(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sf = SlimFit(model, opt, freeze_ratio=0.0)
        call = torch.compile(model, backend="aot_eager") if compiled else model
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            ids = torch.randint(0, 40, (8, 8), generator=g)
            loss = call(input_ids=ids, labels=(ids[:, 1] >= 20).long()).loss
            loss.backward()
            opt.step()
            sf.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    torch.testing.assert_close(bert_losses(True), bert_losses(False), rtol=1e-4, atol=1e-5)
    reasons = " ".join(counters["graph_break"])
    assert "bincount" not in reasons and "_dispatch_has_kernel" not in reasons and "generator" not in reasons
