"""The causal-lm task: packing, prompt masking and truncation, exact perplexity, the command line for both data
formats and every kind of run, bench's lower-is-better headline, bad input, and the chunked head's memory."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from checks import expect_cli_error  # noqa: E402
from tiny_bert import save_tiny_bert  # noqa: E402
from tiny_vit import save_vit  # noqa: E402

from slimfit import cli  # noqa: E402
from slimfit.data import DataError  # noqa: E402
from slimfit.finetune import loop  # noqa: E402
from slimfit.finetune.options import FinetuneConfig  # noqa: E402
from slimfit.finetune.report import RESULT_FILES  # noqa: E402
from slimfit.nn.column_blocks import ColumnBlockLinear  # noqa: E402
from slimfit.tasks import causal_lm, infer_task  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = "the cat dog sat ran on a mat park in big small red blue and then it was day sun".split()
UNK, BOS, EOS = 0, 1, 2
SHORT = ["--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--quiet"]


def save_tokenizer(folder: Path, bos: bool) -> None:
    """A word-level tokenizer over ``WORDS`` (id = 3 + index) with BOS and EOS but no pad token; ``bos``: it
    prepends BOS like Llama's, else nothing like GPT-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(folder)


def save_llama(folder: Path, vocab_size: int = 64, hidden: int = 32) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads) and the BOS tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, bos=True)
    return folder


def save_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 (Conv1D projections, tied head) with the tokenizer that adds no special tokens."""
    config = transformers.GPT2Config(
        vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=EOS, eos_token_id=EOS
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    save_tokenizer(folder, bos=False)
    return folder


def sentence(i: int, length: int) -> str:
    return " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(length))


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal_lm")
    texts = [{"text": sentence(i, 3 + i % 9)} for i in range(40)]
    pairs = [{"prompt": sentence(i, 2 + i % 7), "response": sentence(i + 3, 1 + i % 4)} for i in range(40)]
    return {
        "llama": save_llama(root / "llama"),
        "gpt2": save_gpt2(root / "gpt2"),
        "text": write_csv(root / "text.csv", texts),
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
    }


def prepare(**options) -> causal_lm.CausalLMTask:
    return causal_lm.prepare(FinetuneConfig(task="causal-lm", **options))


def ids(text: str) -> list[int]:
    return [3 + WORDS.index(word) for word in text.split()]


# ------------------------------------------------------------------------------------------------ data


def test_plain_text_is_packed_into_blocks_with_eos_between_texts(assets, tmp_path):
    texts = ["the cat sat", "a dog ran in the park", "sun"]
    data = write_csv(tmp_path / "train.csv", [{"text": text} for text in texts])
    task = prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=8)
    stream = [token for text in texts for token in (BOS, *ids(text), EOS)]  # 5 + 8 + 3 = 16 tokens
    assert [block["input_ids"] for block in task.train_dataset] == [stream[:8], stream[8:]]
    assert all(block["labels"] == block["input_ids"] for block in task.train_dataset)
    assert not task.instruction and task.examples == {"train": 3, "eval": 3} and task.blocks["train"] == 2
    assert task.describe() == "3 train / 3 eval texts in 2 / 2 blocks of up to 8 tokens"


def test_the_last_shorter_block_is_kept_and_padded_with_ignored_labels(assets, tmp_path):
    data = write_csv(tmp_path / "train.csv", [{"text": "the cat sat on a mat"}, {"text": "day"}])
    task = prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=8)
    assert [len(block["input_ids"]) for block in task.train_dataset] == [8, 3]
    batch = task.collator(task.train_dataset)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [BOS, *ids("day"), EOS] + [-100] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert task.processor.pad_token == "</s>"  # the tokenizer had none: EOS pads, and the labels still learn EOS


def test_prompt_is_masked_and_the_response_ends_with_eos(assets, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the cat", "response": "sat on a mat", "id": 1}])
    task = prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=16)
    (feature,) = task.train_dataset
    assert feature["input_ids"] == [BOS, *ids("the cat"), *ids("sat on a mat"), EOS]
    assert feature["labels"] == [-100, -100, -100, *ids("sat on a mat"), EOS]
    assert task.instruction and task.describe() == "1 train / 1 eval prompt-response pairs"


def test_long_examples_lose_the_prompts_start_but_keep_bos_and_the_response(assets, tmp_path):
    prompt, response = "the cat sat on a mat in the park", "a dog ran"
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "response": response}])
    task = prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=8)
    (feature,) = task.train_dataset
    assert feature["input_ids"] == [BOS, *ids("in the park"), *ids(response), EOS]
    assert feature["labels"] == [-100] * 4 + [*ids(response), EOS]
    with pytest.raises(DataError, match=r"1 of 1 responses are longer than --max-length 3 tokens .* 4 tokens"):
        prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=3)


def test_gpt2_tokens_without_bos(assets, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the cat sat on a mat", "response": "dog"}])
    task = prepare(model=str(assets["gpt2"]), data=str(data), eval_data=str(data), max_length=4)
    (feature,) = task.train_dataset
    assert feature["input_ids"] == [*ids("on a mat")[1:], *ids("dog"), EOS]
    assert feature["labels"] == [-100, -100, *ids("dog"), EOS]


def test_eval_split_is_seeded_and_by_text(assets):
    first, again = (prepare(model=str(assets["llama"]), data=str(assets["text"]), eval_fraction=0.25) for _ in "ab")
    assert first.examples == {"train": 30, "eval": 10}
    assert first.eval_dataset == again.eval_dataset
    other = prepare(model=str(assets["llama"]), data=str(assets["text"]), eval_fraction=0.25, seed=1)
    assert other.eval_dataset != first.eval_dataset
    blocks = {tuple(feature["input_ids"]) for feature in first.train_dataset}
    assert blocks.isdisjoint(tuple(feature["input_ids"]) for feature in first.eval_dataset)


def test_validate_evaluates_on_a_split_of_the_training_texts(assets):
    options = {"model": str(assets["llama"]), "data": str(assets["text"]), "eval_fraction": 0.25}
    plain, validated = prepare(**options), prepare(**options, validate=True)
    assert validated.examples == {"train": 22, "eval": 8}  # 30 training texts of 40, a quarter of them held out
    blocks = {
        kind: {tuple(f["input_ids"]) for f in getattr(task, kind)}
        for kind in ("train_dataset", "eval_dataset")
        for task in [validated]
    }
    assert blocks["eval_dataset"].isdisjoint(tuple(f["input_ids"]) for f in plain.eval_dataset)
    assert blocks["eval_dataset"].isdisjoint(blocks["train_dataset"])


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluate_is_the_exact_token_mean_and_perplexity_its_exponential(assets, tmp_path):
    records = [{"prompt": sentence(i, 1 + 3 * i), "response": sentence(i, 1 + i % 3)} for i in range(5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    task = prepare(model=str(assets["llama"]), data=str(data), eval_data=str(data), max_length=32)
    model = task.build_model()
    args = transformers.TrainingArguments(
        str(tmp_path / "trainer"), per_device_eval_batch_size=2, use_cpu=True, report_to="none"
    )
    trainer = transformers.Trainer(model=model, args=args, data_collator=task.collator, processing_class=task.processor)

    # Independently: each example alone (no padding), the model's own forward, F.cross_entropy on shifted tokens.
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for feature in task.eval_dataset:
            logits = model(torch.tensor([feature["input_ids"]])).logits[0]
            labels = torch.tensor(feature["labels"][1:])
            total += F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    model.train()
    metrics = task.evaluate(trainer)
    assert tokens == sum(len(record["response"].split()) + 1 for record in records)
    assert metrics["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert list(metrics) == list(task.metric_names) and model.training  # the mode is given back
    output = trainer.predict(task.eval_dataset)  # compute_metrics: the same numbers from gathered logits
    assert task.compute_metrics(output.predictions, output.label_ids) == pytest.approx(metrics, rel=1e-5)


# ------------------------------------------------------------------------------------------------ command line


def run(argv: list[str], output: Path) -> dict:
    assert cli.main([*argv, *SHORT, "--output", str(output)]) == 0
    assert sorted(p.name for p in output.iterdir()) == sorted(RESULT_FILES)
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("model", "data", "method"),
    [
        ("llama", "text", "slimfit"),
        ("llama", "pairs", "slimfit"),
        ("gpt2", "text", "full"),
        ("gpt2", "pairs", "full"),
        ("llama", "pairs", "lora"),
        ("gpt2", "text", "lora"),  # peft's LoRA on GPT-2's Conv1D (fan_in_fan_out)
    ],
)
def test_finetune(assets, tmp_path, capsys, model, data, method):
    argv = ["finetune", "--task", "causal-lm", "--model", str(assets[model]), "--data", str(assets[data])]
    metrics = run([*argv, "--method", method], tmp_path / "run")
    assert metrics["task"] == "causal-lm" and metrics["config"]["task"] == "causal-lm"
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 1.0 < metrics["perplexity"] < 2 * transformers.AutoConfig.from_pretrained(assets[model]).vocab_size
    assert metrics["steps"] == 2 and metrics["memory"]["activations"] > 0
    out = capsys.readouterr().out
    assert ("prompt-response pairs" if data == "pairs" else "blocks of up to 16 tokens") in out


@pytest.mark.parametrize(("model", "adapted"), [("llama", 14), ("gpt2", 8)])
def test_lora_adapts_every_linear_layer_but_not_the_head(assets, model, adapted):
    """Llama: 7 Linear per layer; GPT-2: 4 Conv1D per layer (peft sets fan_in_fan_out itself). The pretrained head
    gets no adapter and stays frozen (peft's CAUSAL_LM type does not train it)."""
    config = FinetuneConfig(task="causal-lm", model=str(assets[model]), data=str(assets["text"]), method="lora")
    peft_model = loop.build_model(causal_lm.prepare(config), config)
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len({name.split(".lora_")[0] for name in trainable}) == adapted
    assert not any("lm_head" in name for name in trainable)


def test_column_blocks_leave_the_lm_head_whole_so_its_logits_stay_chunked(assets, tmp_path):
    """Llama's 14 body Linears are split; its (untied) head is not, since the chunked head and loss need one
    nn.Linear: split, the run would keep the full logits and name lm_head among the uncompressed modules."""
    config = FinetuneConfig(task="causal-lm", model=str(assets["llama"]), data=str(assets["text"]), column_blocks=8)
    model = loop.build_model(causal_lm.prepare(config), config)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert sum(isinstance(m, ColumnBlockLinear) for m in model.modules()) == 14
    argv = ["finetune", "--task", "causal-lm", "--model", str(assets["llama"]), "--data", str(assets["text"])]
    metrics = run([*argv, "--column-blocks", "8"], tmp_path / "run")
    assert metrics["config"]["column_blocks"] == 8 and metrics["uncompressed_modules"] == []


def test_column_blocks_on_gpt2_say_why_nothing_splits(assets, tmp_path, capsys):
    """GPT-2's blocks are Conv1D and its one nn.Linear is the head, tied to the input embedding."""
    argv = ["finetune", "--task", "causal-lm", "--model", str(assets["gpt2"]), "--data", str(assets["text"])]
    fragments = ("--column-blocks: 8 blocks fit no Linear", "widest input: 0 columns", "nor GPT-2's Conv1D")
    expect_error(capsys, tmp_path, [*argv, "--column-blocks", "8"], *fragments)


def test_bench_headline_is_perplexity_lower_is_better(assets, tmp_path, capsys):
    argv = ["bench", "--task", "causal-lm", "--model", str(assets["llama"]), "--data", str(assets["pairs"])]
    assert cli.main([*argv, "--methods", "slimfit", *SHORT, "--output", str(tmp_path / "bench")]) == 0
    with (tmp_path / "bench" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [row["label"] for row in summary] == ["full", "slimfit@0.9"]
    assert {"perplexity", "perplexity_std", "eval_loss", "perplexity_delta"} <= summary[1].keys()
    assert "perplexity_delta_points" not in summary[1]
    delta = float(summary[1]["perplexity"]) - float(summary[0]["perplexity"])
    assert float(summary[1]["perplexity_delta"]) == pytest.approx(delta)
    table = capsys.readouterr().out.splitlines()
    assert "perplexity ↓" in table[0] and "eval_loss ↓" in table[0]
    assert f"{float(summary[0]['perplexity']):.2f} ± 0.00" in table[1]  # as it is, not x100
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 0


def test_task_inference(assets, tmp_path):
    def inferred(path: Path, **options) -> str:
        return infer_task(dataclasses.replace(FinetuneConfig(), data=str(path), **options))

    labelled = write_csv(tmp_path / "labelled.csv", [{"prompt": "a", "response": "b", "label": "x"}])
    assert inferred(assets["pairs"]) == "causal-lm"
    assert inferred(write_csv(tmp_path / "pairs.csv", [{"prompt": "a", "response": "b"}])) == "causal-lm"
    assert inferred(labelled) == "classification"  # a label column: classification data with those names
    assert inferred(assets["text"]) == "classification"  # plain text is never guessed
    assert inferred(assets["text"], task="causal-lm") == "causal-lm"
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"q": "a", "a": "b"}])
    assert inferred(renamed, prompt_column="q", response_column="a") == "causal-lm"


# ------------------------------------------------------------------------------------------------ bad input


def expect_error(capsys, tmp_path: Path, argv: list[str], *fragments: str) -> None:
    output = tmp_path / "out"
    expect_cli_error(capsys, [*argv, *SHORT, "--output", str(output)], *fragments, output=output)


def test_no_model_is_refused(assets, tmp_path, capsys):
    argv = ["finetune", "--task", "causal-lm", "--data", str(assets["text"])]
    expect_error(capsys, tmp_path, argv, "--model: causal-lm needs a local causal language model folder")


def test_missing_column_is_named(assets, tmp_path, capsys):
    argv = ["finetune", "--task", "causal-lm", "--model", str(assets["llama"]), "--data", str(assets["text"])]
    expect_error(capsys, tmp_path, [*argv, "--text-column", "body"], "no column 'body'", "--text-column")
    eval_data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "the cat"}])
    argv = ["finetune", "--model", str(assets["llama"]), "--data", str(assets["pairs"]), "--eval-data", str(eval_data)]
    expect_error(capsys, tmp_path, argv, "eval.jsonl: no column 'response'", "--response-column")


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_model_without_a_causal_lm_head_is_refused(assets, tmp_path, capsys, kind):
    folder = save_vit(tmp_path / "vit") if kind == "vit" else save_tiny_bert(tmp_path / "bert")
    argv = ["finetune", "--task", "causal-lm", "--model", str(folder), "--data", str(assets["text"])]
    reason = "no causal language-model head" if kind == "vit" else "'bert' encoder"
    expect_error(capsys, tmp_path, argv, f"--model: {folder}", reason)


def test_max_length_beyond_the_positions_is_refused(assets, tmp_path, capsys):
    argv = ["finetune", "--task", "causal-lm", "--model", str(assets["gpt2"]), "--data", str(assets["text"])]
    output = tmp_path / "out"
    assert cli.main([*argv, "--quiet", "--max-length", "65", "--output", str(output)]) == 2
    assert "--max-length: 65 tokens is more than the model takes (at most 64" in capsys.readouterr().err
    assert not output.exists()


# ------------------------------------------------------------------------------------------------ memory


def test_slimfit_never_keeps_the_logits(tmp_path):
    """On a model whose vocabulary dominates (4000 tokens, hidden 64), full fine-tuning keeps batch x length x
    vocabulary float32 logits for backward; SlimFit's chunked head keeps less than a quarter of one copy of them."""
    model = save_llama(tmp_path / "llama", vocab_size=4000, hidden=64)
    data = write_csv(tmp_path / "text.csv", [{"text": sentence(i, 40)} for i in range(16)])
    config = FinetuneConfig(
        task="causal-lm", model=str(model), data=str(data), max_length=32, batch_size=4, max_steps=2, eval_fraction=0.25
    )
    task = causal_lm.prepare(config)
    logits = 4 * 32 * 4000 * 4
    full, slimfit = (
        loop.run(dataclasses.replace(config, method=method), task, progress=False) for method in ("full", "slimfit")
    )
    assert full.memory["activations"] > logits
    assert slimfit.memory["activations"] < logits / 4
    assert slimfit.uncompressed_modules == []


def test_logged_loss_with_gradient_accumulation_is_the_steps_loss(assets, tmp_path):
    """The Trainer normalises a causal LM's loss by the step's token count: 2 accumulated micro-batches of 2 must
    log the loss that one batch of 4 logs (random init, no dropout in these configs), not half of it."""

    def first_loss(folder: Path, *extra: str) -> float:
        argv = ["finetune", "--task", "causal-lm", "--model", str(assets["llama"]), "--data", str(assets["text"])]
        argv += ["--method", "full", "--max-steps", "1", "--quiet", *extra]
        assert cli.main([*argv, "--output", str(folder)]) == 0
        with (folder / "steps.csv").open() as handle:
            return float(next(csv.DictReader(handle))["loss"])

    whole = first_loss(tmp_path / "a", "--batch-size", "4")
    accumulated = first_loss(tmp_path / "b", "--batch-size", "2", "--gradient-accumulation-steps", "2")
    assert accumulated == pytest.approx(whole, rel=1e-4)
