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


def train_recording(backend, steps: int = 8) -> dict:
    """Train Net under SlimFit at freeze ratio 0.5 (compiled with ``backend``, or eager for None) and record what a
    stale graph would get wrong: per step the trainable set, which parameters received a gradient and the loss, then
    the final weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sf = SlimFit(net, opt, freeze_ratio=0.5, seed=0)
    model = net if backend is None else torch.compile(net, backend=backend)
    record = {"sets": [], "graded": [], "requires_grad": [], "losses": []}
    for x, y in data(steps):
        record["sets"].append(tuple(sf.trainable_layers()))
        loss = (model(x) - y).square().mean()
        loss.backward()
        record["graded"].append({n for n, p in net.named_parameters() if p.grad is not None})
        record["requires_grad"].append({n for n, p in net.named_parameters() if p.requires_grad})
        opt.step()
        sf.step()
        opt.zero_grad()
        record["losses"].append(loss.item())
    record["sets"].append(tuple(sf.trainable_layers()))  # and the one chosen after the last step
    record["weights"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    return record


def check_compiled_matches_eager(compiled: dict, eager: dict) -> None:
    # The schedule really moves: several distinct sets, so the compiled model has to follow requires_grad changes.
    assert len(set(eager["sets"])) >= 3, eager["sets"]
    for step, (graded, wanted) in enumerate(zip(compiled["graded"], compiled["requires_grad"], strict=True)):
        # A graph compiled for an earlier set would give frozen layers a gradient and leave thawed ones without.
        assert graded == wanted, f"step {step}: gradients for {sorted(graded ^ wanted)} disagree with requires_grad"
    assert compiled["sets"] == eager["sets"]
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=1e-6)
    for name, weight in eager["weights"].items():
        torch.testing.assert_close(
            compiled["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_compiled_model_follows_a_changing_trainable_set_like_eager_without_graph_breaks():
    """8 steps at freeze ratio 0.5 (6 distinct sets): compiled losses, gradients, schedule and final weights equal
    eager's (measured: exactly equal with aot_eager)."""
    eager = train_recording(None)
    counters.clear()
    compiled = train_recording("aot_eager")
    check_compiled_matches_eager(compiled, eager)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph per distinct trainable set; a set seen again reuses its graph.
    assert 1 <= graph_count() <= len(set(compiled["sets"]))


def test_a_stale_compiled_graph_would_be_caught():
    """The check above is not vacuous: a backend that keeps serving the graph compiled for the first trainable set
    (i.e. ignores the requires_grad changes Dynamo guards on) fails it."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    first = []

    def stale(gm, example_inputs):
        if not first:
            first.append(aot_eager(gm, example_inputs))
        return first[0]

    eager = train_recording(None, steps=4)
    check_compiled_matches_eager(eager, eager)  # 4 steps already see enough distinct sets
    with pytest.raises(AssertionError, match=r"step 1: gradients for .* disagree with requires_grad"):
        check_compiled_matches_eager(train_recording(stale, steps=4), eager)


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
