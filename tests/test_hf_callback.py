"""SlimFitCallback under transformers.Trainer: training, checkpoint with SlimFit state, exact resume."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from tiny_bert import save_tiny_bert, texts  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from slimfit.integrations.hf import STATE_FILE, SlimFitCallback  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("hf") / "model")


def examples(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = texts(32)
    encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=16, padding="max_length")
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(label == "tech")}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)
    ]


def make_trainer(model_dir, output_dir, callback, max_steps=6):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=examples(model_dir), callbacks=[callback])


def trained_weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


class Recording(SlimFitCallback):
    """Records which layers trained at each optimizer step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.schedule = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.schedule.append(self.slimfit.trainable_layers())
        super().on_optimizer_step(args, state, control, **kwargs)


def test_trainer_trains_saves_and_resumes_exactly(model_dir, tmp_path):
    callback = Recording(freeze_ratio=0.5, compression=None)
    trainer = make_trainer(model_dir, tmp_path / "a", callback)
    before = trained_weights(trainer)
    trainer.train()
    # Half of the 22 layers trained at each step, the set changed, and training changed the model.
    assert len(callback.schedule) == 6 and all(len(names) == 11 for names in callback.schedule)
    assert len({tuple(names) for names in callback.schedule}) > 1
    uninterrupted = trained_weights(trainer)
    assert any(not torch.equal(before[n], uninterrupted[n]) for n in before)
    # At the end the callback detaches: every parameter trains again, as before SlimFit.
    assert callback.slimfit is None and all(p.requires_grad for p in trainer.model.parameters())
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(f".{STATE_FILE}")]  # no temporary file left

    resumed = Recording(freeze_ratio=0.5, compression=None)
    trainer = make_trainer(model_dir, tmp_path / "a", resumed)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.schedule == callback.schedule[3:]
    for name, value in trained_weights(trainer).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_resume_without_slimfit_state_is_an_error(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path / "b", SlimFitCallback(freeze_ratio=0.5, compression=None), max_steps=3)
    trainer.train()
    (tmp_path / "b" / "checkpoint-3" / STATE_FILE).unlink()
    trainer = make_trainer(model_dir, tmp_path / "b", SlimFitCallback(freeze_ratio=0.5, compression=None), max_steps=6)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))


def test_bad_freeze_ratio_fails_at_construction():
    with pytest.raises(ValueError, match="freeze_ratio"):
        SlimFitCallback(freeze_ratio=1.0)
