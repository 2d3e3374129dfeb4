"""Estimated peak training memory of a Llama-3.2-1B-class model, full fine-tuning vs SlimFit, by category.

Model: Llama-3.2-1B's configuration (hidden 2048, intermediate 8192, 16 layers, 32 query / 8 key-value heads of
dimension 64, vocabulary 128,256, tied input/output embeddings, RMSNorm eps 1e-5, llama3 rotary scaling, no
biases), random weights, bf16 throughout, batch 1 x 2048 tokens with labels, AdamW.

Nothing here is guessed from formulas except what is exact by construction:

- weights, gradients and AdamW state are counted from the parameters of the 16-layer model built on the meta
  device (exact counts; bf16 weights and gradients, two fp32 moments per trainable parameter);
- saved activations are *measured* (:class:`slimfit.memory.SavedTensorMeter`, as in ``bench_memory.py``) on the
  same model with 1, 2 and 3 decoder layers and the full vocabulary, and scaled:
  full fine-tuning: ``saved(L, T) = fixed(T) + L * block(T)`` with ``block = saved(2, T) - saved(1, T)``, both affine
  in the token count T from T = 256 and 512; checked against direct measurements at 3 layers x 512 tokens and at
  1 and 2 layers x 2048 tokens.
  SlimFit (default ``CompressionPolicy``, freeze ratio 0.9): what a decoder block keeps depends on which of
  its 9 layers train and on whether its input needs a gradient (some layer below it trains), and what the
  embedding / final norm / chunked LM head and loss keep depends on whether the embedding, the final norm and the
  final hidden state need one. Each such state is measured once (per-block bytes attributed with forward hooks
  on the decoder layers, at 256 and 512 tokens), so the saved bytes of any trainable set of the 16-layer model are
  a sum of measured terms, checked against direct measurements on 2 layers x 2048 and 3 layers x 512 tokens.

``--freeze-unit`` picks what the freeze ratio counts, as ``slimfit.SlimFit``'s ``freeze_unit`` (default: the
library's default, ``parameters``):

- ``parameters``: SlimFit itself is built on the 16-layer meta-device model, once per seed, so the budget (10% of
  the elements of all 146 candidate layers, the embedding included: 123,581,440), the layers larger than it (the
  tied embedding / LM head, 262.7M elements: it stays frozen, as SlimFit warns) and the costs are the library's
  own. Expected case: the mean over the trainable sets of the scheduler's warm-up steps (every step that trains
  a layer not trained before; the layers that trained get uniform random scores, so the ranked layers that fill
  what the pending ones leave of the budget are a random pick) of gradients, moments, score sample and saved
  activations. Each such set holds all 33 RMSNorm weights (2,048 elements each, they fit beside any choice of
  matrices), so from block 0's input norm on everything needs a gradient. Worst case: the set within the budget
  with the most device memory, i.e. the largest sum of gradients + moments + score sample + saved activations,
  found exactly by dynamic programming over the blocks (each block any of its 512 trainable subsets, every one
  measured with and without an input gradient; state: matrix elements used, whether the next block's input needs
  a gradient, whether the rotary tables are kept) and the final norm. The norms never bind: the most matrix
  elements that fit plus all norms is within the budget (asserted), so only matrix elements are tracked.
- ``layers``: ``K = round(0.1 * N)`` of the ``N`` layers of ``slimfit.layers.split_parameters`` train per step.
  Expected case: each layer trains K/N of the steps for gradients and moments; activations averaged over the
  full K-chunks of ``InterLayerScheduler``'s warm-up orders over many seeds. Worst case: the K largest layers
  (the embedding and K - 1 MLP matrices), placed to keep the most activations.

Usage: python benchmarks/estimate_llama_1b.py [--out benchmarks/results/estimate-llama-1b-DATE.md] [--seeds 50]
       [--freeze-unit {parameters,layers}]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import time
import warnings

import torch
import transformers

import slimfit
from slimfit.layers import split_parameters
from slimfit.memory import SavedTensorMeter
from slimfit.models import patch
from slimfit.policy import CompressionPolicy
from slimfit.scheduler import FREEZE_UNITS, InterLayerScheduler
from slimfit.scoring import sample_bytes

GiB = 2**30
MiB = 2**20
FREEZE_RATIO = 0.9
GRAD_BYTES, MOMENT_BYTES = 2, 8  # bf16 gradients, two fp32 AdamW moments per trainable parameter
SCORE_SEED = 1_000_000  # + seed: the random update scores that drive the parameter-counting warm-up
LAYERS = 16
TOKENS = 2048
FIT_TOKENS = (256, 512)
PREFIX = "model.layers."
EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"
QK = ("q_proj", "k_proj")
MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")

# meta-llama/Llama-3.2-1B config.json (the values that shape the model; the rest are transformers' defaults).
LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)


def config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA_3_2_1B)


def build(layers: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(layers)).to(torch.bfloat16).train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, LLAMA_3_2_1B["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))


# ---------------------------------------------------------------- trainable sets ("plans")


class Plan(tuple):
    """A trainable set in a model-size-independent form: (embedding trains, final norm trains, per-block sets)."""

    def __new__(cls, embed: bool, norm: bool, blocks: tuple[frozenset[str], ...]):
        return super().__new__(cls, (bool(embed), bool(norm), tuple(frozenset(b) for b in blocks)))

    embed = property(lambda self: self[0])
    norm = property(lambda self: self[1])
    blocks = property(lambda self: self[2])

    @classmethod
    def from_names(cls, names: set[str], layers: int) -> Plan:
        blocks = [set() for _ in range(layers)]
        for name in names:
            if name.startswith(PREFIX):
                index, local = name[len(PREFIX) :].split(".", 1)
                blocks[int(index)].add(local)
            elif name not in (EMBED, NORM):
                raise ValueError(f"unexpected layer {name!r}")
        return cls(EMBED in names, NORM in names, tuple(blocks))

    def names(self) -> set[str]:
        out = {f"{PREFIX}{i}.{local}" for i, block in enumerate(self.blocks) for local in block}
        return out | ({EMBED} if self.embed else set()) | ({NORM} if self.norm else set())

    def states(self) -> tuple[list[tuple[bool, frozenset[str]]], tuple[bool, bool, bool]]:
        """Per block (input needs a gradient, its trainable layers), and (embedding, final norm, final hidden
        state needs a gradient) for the part outside the blocks."""
        grad, blocks = self.embed, []
        for block in self.blocks:
            blocks.append((grad, block))
            grad = grad or bool(block)
        return blocks, (self.embed, self.norm, grad)


def apply(model: torch.nn.Module, plan: Plan | None) -> None:
    """Make exactly ``plan``'s layers trainable (``None``: every parameter, i.e. full fine-tuning)."""
    names = None if plan is None else plan.names()
    for name, p in model.named_parameters():
        p.requires_grad_(names is None or name in names)


def scheduler_draws(layer_names: list[str], seeds: int) -> list[set[str]]:
    """The trainable sets of SlimFit's warm-up steps (the full chunks of ``K`` of each seed's warm-up order)."""
    n = len(layer_names)
    k = max(1, round((1 - FREEZE_RATIO) * n))
    sets = []
    for seed in range(seeds):
        order = InterLayerScheduler(n, k, torch.Generator().manual_seed(seed)).warmup_order.tolist()
        sets += [{layer_names[i] for i in order[j : j + k]} for j in range(0, n - k + 1, k)]
    return sets


def parameter_schedule(layers: int, seeds: range) -> tuple[list[str], int, list[set[str]]]:
    """SlimFit counting parameters, built by the library itself on a meta-device model of ``layers`` decoder
    layers, once per seed: its schedulable layers (a layer larger than the per-step budget stays frozen and is not
    among them), its budget in elements, and the trainable sets of its warm-up steps (every step that trains a
    layer not trained before). After each step the layers that trained get uniform random scores, so the ranked
    layers that fill what the pending ones leave of the budget are a random pick."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config(layers))
    sets = []
    for seed in seeds:
        optimizer = torch.optim.AdamW(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers too large for the budget (reported by name); uncompressed norms
            sf = slimfit.SlimFit(model, optimizer, freeze_ratio=FREEZE_RATIO, freeze_unit="parameters", seed=seed)
        names, budget, scheduler = sf.layer_names, sf.num_trainable, sf.scheduler
        scores = torch.Generator().manual_seed(SCORE_SEED + seed)
        while any(not scheduler.scored[i] for i in scheduler.trainable):
            trainable = scheduler.trainable
            sets.append({names[i] for i in trainable})
            scheduler.step(trainable, torch.rand(len(trainable), generator=scores))
        sf.remove()
    return names, budget, sets


def device_bytes(size: int) -> int:
    """Bytes a trainable layer of ``size`` bf16 elements adds on the device: gradient, AdamW moments, score sample."""
    return (GRAD_BYTES + MOMENT_BYTES) * size + sample_bytes(size, 2)


# ---------------------------------------------------------------- measuring


def measure(model, n: int, labels: bool = True, input_grad: bool = False) -> dict:
    """Saved-for-backward bytes after one forward of ``n`` tokens (``total``) and each decoder block's share.

    A block's share is what the graph gained between entering and leaving it (a storage counts once, in the block
    that saved it first). The rotary cos / sin tables are computed once per forward and kept by every block whose
    queries or keys need a gradient (``rope_users``); ``shares`` leave them out (``rope_bytes``), so that they are
    counted once per model. ``labels=False`` runs the decoder stack alone (``model.model``); ``input_grad`` then
    makes the embedding output require grad, as if a layer below had trained.
    """
    ids = tokens(n)
    blocks = model.model.layers
    marks: list[int] = []
    rope: list[torch.Tensor] = []
    users = [False] * len(blocks)
    meter = SavedTensorMeter(model)

    def uses_rope(i: int):
        def hook(module, args, out):
            users[i] = users[i] or out.requires_grad

        return hook

    hooks = [m.register_forward_pre_hook(lambda *_: marks.append(meter.live_bytes)) for m in blocks]
    hooks += [m.register_forward_hook(lambda *_: marks.append(meter.live_bytes)) for m in blocks]
    hooks += [getattr(m.self_attn, p).register_forward_hook(uses_rope(i)) for i, m in enumerate(blocks) for p in QK]
    hooks.append(model.model.rotary_emb.register_forward_hook(lambda m, i, o: rope.extend(o)))
    if input_grad:
        hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.detach().requires_grad_()))
    torch.manual_seed(0)
    try:
        with meter:
            out = model(input_ids=ids, labels=ids) if labels else model.model(input_ids=ids)
        total = meter.live_bytes
    finally:
        for h in hooks:
            h.remove()
    del out
    rope_bytes = sum(t.untyped_storage().nbytes() for t in rope)
    first = users.index(True) if any(users) else None
    shares = [marks[2 * i + 1] - marks[2 * i] - (rope_bytes if i == first else 0) for i in range(len(blocks))]
    return dict(total=total, shares=shares, rope_users=users, rope_bytes=rope_bytes)


def affine(values: dict[int, float]) -> tuple[float, float]:
    """(fixed, per token) through the measurements at FIT_TOKENS."""
    (t1, v1), (t2, v2) = sorted(values.items())
    slope = (v2 - v1) / (t2 - t1)
    return v1 - slope * t1, slope


def at(fit: tuple[float, float], n: int) -> float:
    return fit[0] + fit[1] * n


class SlimFitTables:
    """Measured bytes of each block state and each outside-the-blocks state, affine in tokens."""

    def __init__(self, model) -> None:
        self.model = model  # 1 decoder layer, patched
        self.block: dict[tuple[bool, frozenset[str]], tuple[tuple[float, float], bool]] = {}
        self.outside: dict[tuple[bool, bool, bool], tuple[float, float]] = {}
        self.rope = {}  # tokens -> bytes of the rotary cos / sin tables

    def block_fit(self, state: tuple[bool, frozenset[str]]) -> tuple[tuple[float, float], bool]:
        """(affine fit of the block's share, whether it keeps the rotary tables)."""
        if state not in self.block:
            input_grad, trainable = state
            apply(self.model, Plan(False, False, (trainable,)))
            runs = {n: measure(self.model, n, labels=False, input_grad=input_grad) for n in FIT_TOKENS}
            self.rope.update({n: r["rope_bytes"] for n, r in runs.items()})
            self.block[state] = (
                affine({n: r["shares"][0] for n, r in runs.items()}),
                runs[FIT_TOKENS[0]]["rope_users"][0],
            )
        return self.block[state]

    def outside_fit(self, state: tuple[bool, bool, bool]) -> tuple[float, float]:
        if state not in self.outside:
            embed, norm, hidden_grad = state
            # A 1-layer model whose block trains one layer when only that can make the final hidden state need
            # a gradient; the block's share (hooks) and the rotary tables are subtracted.
            block = {"self_attn.o_proj.weight"} if hidden_grad and not embed else set()
            apply(self.model, Plan(embed, norm, (frozenset(block),)))
            values = {}
            for n in FIT_TOKENS:
                r = measure(self.model, n)
                values[n] = r["total"] - r["shares"][0] - (r["rope_bytes"] if r["rope_users"][0] else 0)
            self.outside[state] = affine(values)
        return self.outside[state]

    def predict(self, plan: Plan, n: int) -> float:
        blocks, outside = plan.states()
        fits = [self.block_fit(s) for s in blocks]
        rope = affine(self.rope) if any(uses for _, uses in fits) else (0.0, 0.0)
        return sum(at(fit, n) for fit, _ in fits) + at(self.outside_fit(outside), n) + at(rope, n)


def patched(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patch(model, CompressionPolicy())


def small_plans(layers: int, count: int, seed: int) -> list[Plan]:
    """Random SlimFit-sized trainable sets of a ``layers``-layer model, the last one with the embedding."""
    with torch.device("meta"):
        names = [layer.name for layer in split_parameters(transformers.LlamaForCausalLM(config(layers))).layers]
    k = max(2, round((1 - FREEZE_RATIO) * len(names)))
    g = torch.Generator().manual_seed(seed)
    plans = []
    for i in range(count):
        chosen = {names[j] for j in torch.randperm(len(names), generator=g)[:k].tolist()}
        if i == count - 1:
            chosen = {EMBED} | set(list(sorted(chosen - {EMBED}))[: k - 1])
        plans.append(Plan.from_names(chosen, layers))
    return plans


def worst_case_activations(tables: SlimFitTables, k: int, n: int) -> tuple[float, Plan]:
    """The K largest layers (tied embedding + K - 1 of the 3 x 16 MLP matrices), the MLP matrices placed in the
    blocks (dynamic programming over blocks) so that the saved bytes are largest."""
    best = {}  # count of MLP matrices in a block -> (bytes, set)
    for c in range(4):
        options = [
            (at(tables.block_fit((True, frozenset(s)))[0], n), frozenset(s)) for s in itertools.combinations(MLP, c)
        ]
        best[c] = max(options, key=lambda o: o[0])
    # dp[j] = (bytes, per-block sets) using j matrices in the blocks so far
    dp = {0: (0.0, ())}
    for _ in range(LAYERS):
        nxt = {}
        for j, (b, sets) in dp.items():
            for c in range(4):
                if j + c <= k - 1 and (j + c not in nxt or nxt[j + c][0] < b + best[c][0]):
                    nxt[j + c] = (b + best[c][0], sets + (best[c][1],))
        dp = nxt
    plan = Plan(True, False, dp[k - 1][1])
    return tables.predict(plan, n), plan


def worst_case_by_parameters(tables: SlimFitTables, sizes: dict[str, int], budget: int, n: int) -> tuple[float, Plan]:
    """The trainable set of schedulable layers (``sizes``) within ``budget`` elements whose gradients, moments,
    score sample and saved activations at ``n`` tokens add up to the most bytes on the device (exact, by dynamic
    programming over the blocks, each block any subset of its layers, then the final norm).

    Only the matrices are tracked against the budget: the smallest layers (the RMSNorm weights) all fit beside
    the most matrix elements that fit (asserted), so they never decide whether a set fits. The DP state is
    (matrix elements used, whether the next block's input needs a gradient, whether the rotary tables are kept).
    """
    small = min(sizes.values())
    reachable = {0}  # sums of matrix sizes within the budget
    for size in sizes.values():
        if size != small:
            reachable |= {r + size for r in reachable if r + size <= budget}
    smalls = sum(size for size in sizes.values() if size == small)
    assert max(reachable) + smalls <= budget, "the smallest layers could decide whether a set fits"
    shape: dict[str, int] = {}
    for name, size in sizes.items():
        if name.startswith(PREFIX + "0."):
            shape[name[len(PREFIX) + 2 :]] = size
    assert all(sizes[f"{PREFIX}{i}.{local}"] == size for i in range(LAYERS) for local, size in shape.items())
    assert set(sizes) == {f"{PREFIX}{i}.{local}" for i in range(LAYERS) for local in shape} | {NORM}
    subsets = [frozenset(c) for r in range(len(shape) + 1) for c in itertools.combinations(sorted(shape), r)]
    terms = {}  # (input needs a gradient, subset) -> (device bytes, keeps the rotary tables, matrix elements)
    for grad in (False, True):
        for s in subsets:
            fit, rope = tables.block_fit((grad, s))
            terms[grad, s] = (
                at(fit, n) + sum(device_bytes(shape[x]) for x in s),
                rope,
                sum(shape[x] for x in s if shape[x] != small),
            )
    dp = {(0, False, False): (0.0, ())}
    for _ in range(LAYERS):
        nxt: dict[tuple[int, bool, bool], tuple[float, tuple]] = {}
        for (used, grad, rope), (value, sets) in dp.items():
            for s in subsets:
                b, r, c = terms[grad, s]
                key = (used + c, grad or bool(s), rope or r)
                if key[0] <= budget and (key not in nxt or nxt[key][0] < value + b):
                    nxt[key] = (value + b, sets + (s,))
        dp = nxt
    rope_bytes = at(affine(tables.rope), n)
    best = None
    for (_, grad, rope), (value, sets) in dp.items():
        for norm in (False, True):
            total = value + at(tables.outside_fit((False, norm, grad)), n) + (rope_bytes if rope else 0.0)
            total += device_bytes(sizes[NORM]) if norm else 0
            if best is None or total > best[0]:
                best = (total, Plan(False, norm, sets))
    plan = best[1]
    return tables.predict(plan, n), plan


def check_plans(layers: int, unit: str, worst: Plan | None) -> list[Plan]:
    """Trainable sets of a ``layers``-layer model whose saved bytes are measured directly to check the tables."""
    if unit == "layers":
        return small_plans(layers, 3, layers - 1)
    # The first two warm-up sets of the small model's own parameter-counting schedule, and the 16-layer worst
    # case cut to its first blocks (with its final norm).
    _, _, sets = parameter_schedule(layers, range(layers - 1, layers))
    return [Plan.from_names(s, layers) for s in sets[:2]] + [Plan(worst.embed, worst.norm, worst.blocks[:layers])]


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    parser.add_argument("--seeds", type=int, default=50, help="warm-up orders drawn for the expected SlimFit case")
    parser.add_argument(
        "--freeze-unit",
        default=FREEZE_UNITS[0],
        choices=list(FREEZE_UNITS),
        help="what the freeze ratio counts (slimfit.SlimFit's freeze_unit; default: the library's)",
    )
    args = parser.parse_args()
    unit = args.freeze_unit
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    # Exact parameter counts of the 16-layer model (meta device: no memory).
    with torch.device("meta"):
        big = transformers.LlamaForCausalLM(config(LAYERS))
    params = sum(p.numel() for p in big.parameters())  # tied embedding counted once
    layer_sizes = {layer.name: layer.param.numel() for layer in split_parameters(big).layers}
    assert sum(layer_sizes.values()) == params, "every parameter is a schedulable layer (Llama has no biases)"
    del big
    if unit == "layers":
        names = list(layer_sizes)
        n_layers = len(names)
        k = max(1, round((1 - FREEZE_RATIO) * n_layers))
        draws = scheduler_draws(names, args.seeds)
        log(f"{params:,} parameters, {n_layers} schedulable layers, K = {k}")
    else:
        names, budget, draws = parameter_schedule(LAYERS, range(args.seeds))
        n_layers = len(names)
        too_large = [name for name in layer_sizes if name not in names]
        scheduled = {name: layer_sizes[name] for name in names}
        log(f"{params:,} parameters, budget {budget:,}, {n_layers} schedulable layers (frozen: {too_large})")
    worst_plan = None

    # ---- full fine-tuning: saved(L, T) = fixed(T) + L * block(T), measured at L = 1, 2 and T = 256, 512.
    full: dict[tuple[int, int], int] = {}
    checks: list[tuple[str, float, int]] = []
    tables = None
    validation: list[tuple[str, Plan, int, int]] = []
    for layers in (1, 2, 3):
        model = build(layers)
        apply(model, None)
        for n in {1: (*FIT_TOKENS, TOKENS), 2: (*FIT_TOKENS, TOKENS), 3: (512,)}[layers]:
            full[layers, n] = measure(model, n)["total"]
            log(f"full fine-tuning, {layers} layer(s) x {n} tokens: {full[layers, n] / MiB:.1f} MiB saved")
        handle = patched(model)
        if layers == 1:
            tables = SlimFitTables(model)
            for plan_names in draws:
                tables.predict(Plan.from_names(plan_names, LAYERS), TOKENS)  # measures every state it needs
            if unit == "layers":
                worst_saved, worst_plan = worst_case_activations(tables, k, TOKENS)
            else:
                worst_saved, worst_plan = worst_case_by_parameters(tables, scheduled, budget, TOKENS)
            for layers_v, n_v in ((2, TOKENS), (3, 512)):
                for plan in check_plans(layers_v, unit, worst_plan):
                    tables.predict(plan, n_v)
            log(f"SlimFit tables: {len(tables.block)} block states, {len(tables.outside)} outside states measured")
            tables.model = None
        else:
            n_v = TOKENS if layers == 2 else 512
            for plan in check_plans(layers, unit, worst_plan):
                apply(model, plan)
                measured = measure(model, n_v)["total"]
                validation.append((f"SlimFit, {layers} layers x {n_v} tokens", plan, n_v, measured))
                log(f"SlimFit check {sorted(plan.names())}: {measured / MiB:.2f} MiB measured")
        if handle.unsupported:
            raise RuntimeError(f"modules left uncompressed: {handle.unsupported}")
        handle.remove()
        del model, handle

    fixed = affine({n: 2 * full[1, n] - full[2, n] for n in FIT_TOKENS})
    block = affine({n: full[2, n] - full[1, n] for n in FIT_TOKENS})

    def full_saved(layers: int, n: int) -> float:
        return at(fixed, n) + layers * at(block, n)

    for key in ((3, 512), (1, TOKENS), (2, TOKENS)):
        checks.append((f"full fine-tuning, {key[0]} layer(s) x {key[1]} tokens", full_saved(*key), full[key]))
    for label, plan, n, measured in validation:
        checks.append((label, tables.predict(plan, n), measured))

    # ---- SlimFit activations over the schedule's trainable sets, and the worst case.
    saved = sorted(tables.predict(Plan.from_names(s, LAYERS), TOKENS) for s in draws)
    mean_saved = sum(saved) / len(saved)
    worst_params = sum(layer_sizes[n] for n in worst_plan.names())
    draw_params = sum(sum(layer_sizes[n] for n in s) for s in draws) / len(draws)
    worst_snapshot = sum(sample_bytes(layer_sizes[n], 2) for n in worst_plan.names())
    if unit == "parameters":  # the worst case holds at least as many bytes as any set the warm-up drew

        def variable_bytes(names: set[str]) -> float:
            plan = Plan.from_names(names, LAYERS)
            return sum(device_bytes(layer_sizes[n]) for n in names) + tables.predict(plan, TOKENS)

        assert max(variable_bytes(s) for s in draws) <= variable_bytes(worst_plan.names())
    if unit == "layers":
        expected_params = params * k / n_layers
        expected_snapshot = sum(sample_bytes(size, 2) for size in layer_sizes.values()) * k / n_layers
        with_moments = params  # every layer trains at some step, so each has moments (on the device or the host)
    else:
        expected_params = draw_params
        expected_snapshot = sum(sum(sample_bytes(layer_sizes[n], 2) for n in s) for s in draws) / len(draws)
        with_moments = sum(scheduled.values())  # a layer that never trains never gets optimizer state
        draw_sizes = sorted(sum(layer_sizes[n] for n in s) for s in draws)
        norms = {n for n in names if "norm" in n}
        with_norms = sum(norms <= s for s in draws)
        # Blocks whose input needs a gradient, per draw.
        grad_blocks = sorted(sum(g for g, _ in Plan.from_names(s, LAYERS).states()[0]) for s in draws)
        grad_range = (
            str(grad_blocks[0]) if grad_blocks[0] == grad_blocks[-1] else f"{grad_blocks[0]} to {grad_blocks[-1]}"
        )
    log(f"{len(draws)} draws: saved {saved[0] / MiB:.0f} .. {saved[-1] / MiB:.0f} MiB, mean {mean_saved / MiB:.0f}")

    def pct(q: float) -> float:
        return saved[min(len(saved) - 1, round(q * (len(saved) - 1)))]

    columns = {
        "full fine-tuning": dict(
            weights=2 * params,
            gradients=GRAD_BYTES * params,
            adam=MOMENT_BYTES * params,
            snapshot=0,
            saved=full_saved(LAYERS, TOKENS),
            host=0,
        ),
        "SlimFit, expected": dict(
            weights=2 * params,
            gradients=GRAD_BYTES * expected_params,
            adam=MOMENT_BYTES * expected_params,
            snapshot=expected_snapshot,
            saved=mean_saved,
            host=MOMENT_BYTES * (with_moments - expected_params),
        ),
        "SlimFit, worst case": dict(
            weights=2 * params,
            gradients=GRAD_BYTES * worst_params,
            adam=MOMENT_BYTES * worst_params,
            snapshot=worst_snapshot,
            saved=worst_saved,
            host=MOMENT_BYTES * (with_moments - worst_params),
        ),
    }
    for c in columns.values():
        c["total"] = c["weights"] + c["gradients"] + c["adam"] + c["snapshot"] + c["saved"]
    rows = [
        ("weights (bf16)", "weights"),
        ("gradients (bf16)", "gradients"),
        ("AdamW moments on the device (2 x fp32)", "adam"),
        ("SlimFit's score sample (1% of the trainable layers' bytes)", "snapshot"),
        ("activations saved for backward", "saved"),
        ("**total on the device**", "total"),
        ("AdamW moments offloaded to host memory (not in the total)", "host"),
    ]
    table = "| category | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    for label, key in rows:
        cells = [f"{c[key] / GiB:.2f}" for c in columns.values()]
        if key == "total":
            cells = [f"**{x}**" for x in cells]
        table += f"| {label} | " + " | ".join(cells) + " |\n"
    full_total, slim_total = columns["full fine-tuning"]["total"], columns["SlimFit, expected"]["total"]
    table += (
        f"\nTotal: {full_total / slim_total:.1f}x less on the device than full fine-tuning (expected case), "
        f"{full_total / columns['SlimFit, worst case']['total']:.1f}x in the worst case; activations "
        f"{columns['full fine-tuning']['saved'] / mean_saved:.1f}x less.\n"
    )

    check_lines = "| case | predicted (MiB) | measured (MiB) | difference (bytes) | error |\n|---|---|---|---|---|\n"
    for label, predicted, measured in checks:
        check_lines += (
            f"| {label} | {predicted / MiB:.2f} | {measured / MiB:.2f} | {predicted - measured:+.0f} "
            f"| {(predicted / measured - 1):+.3%} |\n"
        )
    max_err = max(abs(p / m - 1) for _, p, m in checks)

    groups: dict[str, list[str]] = {}
    for i, b in enumerate(worst_plan.blocks):
        # Counting parameters, the RMSNorm weights are named once, as a count.
        b = [x.split(".")[-2] for x in sorted(b) if unit == "layers" or "norm" not in x]
        if b:
            groups.setdefault(" + ".join(b), []).append(str(i))
    worst_desc = "; ".join(f"{key} in block{'s' * (len(v) > 1)} {', '.join(v)}" for key, v in groups.items())
    command = "python benchmarks/estimate_llama_1b.py --seeds " + str(args.seeds)
    command += "" if unit == FREEZE_UNITS[0] else f" --freeze-unit {unit}"
    if unit == "layers":
        slimfit_setup = (
            f'counting layers (`freeze_unit="layers"`), {n_layers} schedulable layers, K = {k} train per step'
        )
        gradients_text = f"""SlimFit expected: each layer trains in K/N =
  {k}/{n_layers} of the steps (the warm-up visits every layer once; uniform over the schedule assumed
  afterwards), so {expected_params / 1e6:.1f}M parameters in expectation (mean over the {len(draws)} measured
  draws: {draw_params / 1e6:.1f}M). Worst case: the K largest layers, the tied embedding / LM head
  ({layer_sizes[EMBED] / 1e6:.1f}M) and {k - 1} MLP matrices (16.8M each), {worst_params / 1e6:.1f}M parameters."""
        moments_extra = ""
        tables_text = "met"
        expected_text = f"""the warm-up steps of SlimFit's
  `InterLayerScheduler` for seeds 0-{args.seeds - 1} (each a uniformly random {k} of the {n_layers} layers)"""
        spread_reason = """a block
  keeps nothing unless a layer at or below it trains, so sets whose lowest trainable layer sits high keep less."""
        worst_text = f"""Worst case: the embedding plus
  the {k - 1} MLP matrices placed to keep the most ({worst_desc})."""
    else:
        kinds: dict[str, int] = {}
        for x in worst_plan.names():
            kind = "RMSNorm weights" if "norm" in x else x.split(".")[-2]
            kinds[kind] = kinds.get(kind, 0) + 1
        final_norm = " (the final norm included)" if worst_plan.norm else ""
        worst_norms = "all" if norms <= worst_plan.names() else str(len(norms & worst_plan.names()))
        if worst_params == draw_sizes[-1]:
            fill_note = ", as many as the fullest warm-up set"
        else:
            fill_note = f"; the warm-up sets train at most {draw_sizes[-1]:,}"
        worst_kinds = ", ".join(f"{v} {key}" for key, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        slimfit_setup = (
            f'counting parameters (`freeze_unit="parameters"`, the library\'s default): a budget of {budget:,} '
            f"elements per step (10% of the {len(layer_sizes)} candidate layers' {params:,}); "
            + ", ".join(f"`{x}` ({layer_sizes[x]:,})" for x in too_large)
            + f" is larger than the budget and stays frozen (SlimFit warns), leaving {n_layers} schedulable layers"
        )
        if draw_sizes[0] == draw_sizes[-1]:
            fill = f"every one {draw_sizes[0]:,}"
        else:
            fill = f"{draw_sizes[0]:,} to {draw_sizes[-1]:,}"
        gradients_text = f"""SlimFit expected: mean over the {len(draws)} warm-up sets
  below, {expected_params / 1e6:.1f}M parameters ({fill} of the budget's {budget:,}: a step takes
  pending layers in warm-up order while they fit, skipping those that do not, then ranked ones the same way;
  the matrices are multiples of 1,048,576 elements and the norms fill any rest). Worst case (see Activations):
  {worst_params:,} parameters, {worst_kinds}."""
        moments_extra = f""" {", ".join(f"`{x}`" for x in too_large)} never
  trains, so it never gets moments: the host row counts the {n_layers} scheduled layers only."""
        tables_text = "(every one of the 512 subsets of a block's layers, with and without an input gradient)"
        expected_text = f"""the warm-up steps (every step that trains
  a layer not trained before) of SlimFit built by the library on the meta-device model, counting parameters,
  for seeds 0-{args.seeds - 1}; after each step the trained layers got uniform random scores, so the ranked
  layers that fill what the pending ones leave of the budget are a random pick"""
        spread_reason = f"""{with_norms} of
  the {len(draws)} sets hold all {len(norms)} RMSNorm weights (2,048 elements each, they fit into any rest of
  the budget), so block 0's input norm trains, and {grad_range} of the {LAYERS} blocks
  have an input that needs a gradient (all but block 0: the embedding is frozen); the spread comes from which
  matrices train where."""
        worst_text = f"""Worst case: the trainable set within
  the budget with the largest gradients + moments + score sample + saved activations, found exactly by dynamic
  programming over the blocks (each block any of its 512 subsets; state: matrix elements used, whether the next
  block's input needs a gradient, whether the rotary tables are kept) and the final norm. The norms never decide
  whether a set fits (the most matrix elements that fit plus all 33 norms is within the budget), and a
  trained parameter costs 10 bytes of gradient and moments, so the worst case fills the budget with matrices
  ({worst_params:,} parameters: {worst_kinds}{fill_note}) and places them to keep the most
  activations ({worst_saved / MiB:.0f} MiB). Besides {worst_norms} RMSNorm weights{final_norm}:
  {worst_desc}."""
    header = (
        f"# Llama-3.2-1B-class model: estimated peak training memory (GiB), batch 1 x {TOKENS} tokens, bf16\n\n"
        f"{datetime.date.today()} · {platform.machine()} {platform.processor() or ''} · torch {torch.__version__} · "
        f"transformers {transformers.__version__} · slimfit {slimfit.__version__} · "
        f"`{command}`\n\n"
        "Model: `LlamaConfig` with Llama-3.2-1B's values: hidden 2048, intermediate 8192, 16 layers, 32 query / "
        "8 key-value heads, head dim 64, vocabulary 128,256, tied embeddings, rms_norm_eps 1e-5, "
        "max_position_embeddings 131,072, rope llama3 (theta 500,000, factor 32), no biases; random weights, "
        f"SDPA attention, train mode, labels given. {params:,} parameters (counted on the meta device; the tied "
        f"embedding / LM head, {layer_sizes[EMBED]:,}, once). SlimFit: freeze ratio {FREEZE_RATIO} {slimfit_setup}, "
        'default `CompressionPolicy` (chunked LM head and loss), `optimizer_state="offload"`.\n\n'
    )
    how = f"""## How each number was obtained

- **Weights**: 2 bytes x {params:,} parameters.
- **Gradients**: 2 bytes per trainable parameter. Full: all. {gradients_text}
- **AdamW moments**: 2 x fp32 = 8 bytes per trainable parameter (mixed-precision convention; `torch.optim.AdamW`
  on bf16 parameters keeps bf16 moments, half this). SlimFit's default `optimizer_state="offload"` keeps only
  the trainable layers' moments on the device; the frozen layers' moments sit in (pinned) host memory, listed
  separately.{moments_extra}
- **Score sample**: to score a trained layer's update SlimFit needs its weights from before `optimizer.step()`.
  For bf16 weights `scoring="auto"` keeps a sample (`slimfit.scoring.sample_size`): before values, after values
  and int64 positions of at most 1% of the layer's bytes, at least 256 elements (the 2,048-element RMSNorm weights
  get 256; a layer of at most 1,536 bf16 elements would be copied whole), taken before the step and freed in
  `sf.step()`: {expected_snapshot / MiB:.1f} MiB expected, {worst_snapshot / MiB:.1f} MiB in the worst case.
- **Activations**: measured bytes held for backward (`SavedTensorMeter`, every tensor autograd keeps, each
  storage once, parameters excluded) on the same model built with 1, 2 and 3 decoder layers and the full
  vocabulary, bf16, then scaled to {LAYERS} layers and {TOKENS} tokens.
  Full fine-tuning (unpatched, everything trains): `saved(L, T) = fixed(T) + L x block(T)`, `block = saved(2
  layers) - saved(1 layer)`, each affine in T through T = 256 and 512: fixed(T) = {fixed[0] / MiB:.2f} MiB +
  {fixed[1] / 1024:.1f} KiB/token (the log-softmax of the {LLAMA_3_2_1B["vocab_size"]:,} logits in fp32 dominates),
  block(T) = {block[0] / MiB:.2f} MiB + {block[1] / 1024:.1f} KiB/token (attention kept its output and
  log-sum-exp, linear in T, as flash attention does on a GPU).
  SlimFit (patched, default policy): a decoder block's bytes depend on which of its 9 layers train and on whether
  its input needs a gradient (any layer below it trains); the embedding / final norm / chunked head part on
  whether the embedding, the final norm and the final hidden state need one. Each of the {len(tables.block)}
  block states and {len(tables.outside)} outside states {tables_text} was measured on the 1-layer model at 256 and 512
  tokens (a block's share attributed with forward hooks on the decoder layer; the rotary cos / sin tables, kept by
  every block whose queries or keys need a gradient, counted once per model), so any trainable set's bytes are
  a sum of measured terms. Expected: mean over {len(draws)} trainable sets, {expected_text}:
  {mean_saved / MiB:.0f} MiB, spread {saved[0] / MiB:.0f} (min) / {pct(0.05) / MiB:.0f} (5%) /
  {pct(0.5) / MiB:.0f} (median) / {pct(0.95) / MiB:.0f} (95%) / {saved[-1] / MiB:.0f} MiB (max): {spread_reason}
  {worst_text}
- **Total** = the sum of the device rows. It bounds the peak from above: with `zero_grad(set_to_none=True)`
  gradients do not exist during the forward, and activations are freed during backward as gradients appear.
  Not included: the allocator's workspace, temporaries (the chunked head's 1,024 x 128,256 fp32 chunk of
  logits, ~0.5 GiB, exists only inside one chunk; full fine-tuning's bf16 logits returned in `outputs.logits`,
  {TOKENS * LLAMA_3_2_1B["vocab_size"] * 2 / GiB:.2f} GiB, and their fp32 copy while the loss is computed) and
  CUDA context. No GPU measurement exists yet: these are CPU byte counts.

## Checks of the scaling (predicted from the fits vs measured directly)

Largest error: {max_err:.3%}.

{check_lines}"""
    text = header + table + "\n" + how
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
