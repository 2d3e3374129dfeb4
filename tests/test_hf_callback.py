"""SlimFitCallback under transformers.Trainer: training, checkpoint with SlimFit state, exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from tiny_bert import save_tiny_bert, texts  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from slimfit.core import SlimFit  # noqa: E402
from slimfit.integrations.hf import SlimFitCallback  # noqa: E402

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


def make_trainer(model_dir, output_dir, callback, max_steps=6, **overrides):
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
        **overrides,
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


def recording_callback(trainer):
    """The Recording callback the trainer runs (restore_callback_states_from_checkpoint=True replaces it)."""
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, Recording)]
    return callback


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_trainer_trains_saves_and_resumes_exactly(model_dir, tmp_path, restore_callback_states):
    callback = Recording(freeze_ratio=0.5, freeze_unit="layers", compression=None)
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
    # The checkpoint moves to another folder and the resumed run writes to another output_dir: the SlimFit state
    # travels inside the checkpoint's trainer_state.json.
    checkpoint = tmp_path / "elsewhere" / "saved-at-3"
    checkpoint.parent.mkdir()
    shutil.move(tmp_path / "a" / "checkpoint-3", checkpoint)
    shutil.rmtree(tmp_path / "a")

    resumed = Recording(freeze_ratio=0.5, freeze_unit="layers", compression=None)
    trainer = make_trainer(
        model_dir, tmp_path / "b", resumed, restore_callback_states_from_checkpoint=restore_callback_states
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert recording_callback(trainer).schedule == callback.schedule[3:]
    for name, value in trained_weights(trainer).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_resume_without_slimfit_state_is_an_error(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path / "b", SlimFitCallback(freeze_ratio=0.5, compression=None), max_steps=3)
    trainer.train()
    state_file = tmp_path / "b" / "checkpoint-3" / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text())
    assert (
        trainer_state["stateful_callbacks"]["SlimFitCallback"]["attributes"]["slimfit_state"]["scheduler"]["step"] == 3
    )
    del trainer_state["stateful_callbacks"]["SlimFitCallback"]
    state_file.write_text(json.dumps(trainer_state))
    trainer = make_trainer(model_dir, tmp_path / "b", SlimFitCallback(freeze_ratio=0.5, compression=None), max_steps=6)
    with pytest.raises(RuntimeError, match=r"resuming at step 3, .* no SlimFit state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))


def test_slimfit_state_round_trips_through_json_exactly():
    """Scores are float32: huge, tiny and infinite values come back bit-for-bit from the Trainer's JSON."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    sf = SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_ratio=0.5, compression=None)
    scores = torch.tensor([3.3e38, 1.4e-45, math.inf, 0.1], dtype=torch.float32)
    sf.scheduler.scores, sf.scheduler.scored[:] = scores.clone(), True
    text = json.dumps(sf.state_dict())  # what TrainerState.save_to_json does
    sf.remove()
    restored = SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_ratio=0.5, compression=None)
    restored.load_state_dict(json.loads(text))
    assert torch.equal(restored.scheduler.scores, scores) and json.loads(text) == sf.state_dict()


def test_callback_state_is_json_with_any_compression():
    from slimfit.policy import DEFAULT_POLICY, CompressionPolicy

    for compression, written in ((None, None), (DEFAULT_POLICY, "default"), ("default", "default")):
        state = SlimFitCallback(freeze_ratio=0.5, compression=compression, seed=3).state()
        assert json.loads(json.dumps(state)) == {
            "args": {"freeze_ratio": 0.5, "compression": written, "seed": 3},
            "attributes": {"slimfit_state": None},
        }
    custom = CompressionPolicy(activation=None)
    assert SlimFitCallback(compression=custom).state()["args"]["compression"] == repr(custom)


def test_bad_freeze_ratio_fails_at_construction():
    with pytest.raises(ValueError, match="freeze_ratio"):
        SlimFitCallback(freeze_ratio=1.0)
