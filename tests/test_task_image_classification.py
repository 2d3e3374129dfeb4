"""The image-classification task: class folders, model checks, lazy RGB preprocessing, split, metrics, Trainer."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vit import save_vit, write_classes, write_images

from slimfit.data import DataError
from slimfit.tasks.image_classification import ImageClassificationTask, prepare

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def options(
    model: Path | None,
    data: Path,
    eval_data: Path | None = None,
    fraction: float = 0.25,
    seed: int = 0,
    validate: bool = False,
):
    return SimpleNamespace(
        model=model, data=data, eval_data=eval_data, eval_fraction=fraction, seed=seed, validate=validate
    )


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    train = write_classes(root / "train", {"owl": 6, "cat": 6, "dog": 6})
    evaluation = write_classes(root / "eval", {"cat": 2, "dog": 2, "owl": 2})
    # Hidden files and folders are not data.
    (train / "cat" / ".DS_Store").write_bytes(b"\0junk")
    (train / ".cache").mkdir()
    return train, evaluation


@pytest.fixture(scope="module")
def task(vit, folders) -> ImageClassificationTask:
    return prepare(options(vit, *folders))


def test_labels_are_the_sorted_folder_names(task, folders):
    assert task.name == "image-classification"
    assert task.label_names == ["cat", "dog", "owl"]
    assert task.examples == {"train": 18, "eval": 6}
    assert len(task.train_dataset) == 18 and len(task.eval_dataset) == 6
    assert task.describe() == "18 train / 6 eval images, 3 classes"
    for dataset in (task.train_dataset, task.eval_dataset):
        names = [task.label_names[label] for label in dataset.labels]
        assert names == [path.parent.name for path in dataset.paths]


def test_items_are_rgb_pixel_values_of_the_processor_size(task):
    dataset = task.train_dataset
    for index, path in enumerate(dataset.paths):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 16, 16), path.name
        assert item["pixel_values"].dtype == torch.float32
        assert item["labels"] == dataset.labels[index]
        with Image.open(path) as image:
            grey = image.mode == "L"
        if grey:  # repeated in every channel
            assert torch.equal(item["pixel_values"][0], item["pixel_values"][2])
    batch = task.collator([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == dataset.labels[:2]


def test_split_is_stratified_and_seeded(vit, tmp_path):
    data = write_classes(tmp_path / "data", {"a": 20, "b": 8, "c": 12})

    def split(seed: int) -> tuple[list[Path], list[Path]]:
        task = prepare(options(vit, data, fraction=0.25, seed=seed))
        return task.train_dataset.paths, task.eval_dataset.paths

    train, evaluation = split(0)
    assert split(0) == (train, evaluation)
    assert split(1)[1] != evaluation
    assert sorted(train + evaluation) == sorted(data.glob("*/*"))
    assert sorted(p.parent.name for p in evaluation) == ["a"] * 5 + ["b"] * 2 + ["c"] * 3
    # Shuffled, not ordered by class.
    assert [p.parent.name for p in train] != sorted(p.parent.name for p in train)


def test_validate_evaluates_on_a_split_of_the_training_images(vit, tmp_path):
    data = write_classes(tmp_path / "data", {"a": 20, "b": 8, "c": 12})
    plain = prepare(options(vit, data, fraction=0.25, seed=2))
    validated = prepare(options(vit, data, fraction=0.25, seed=2, validate=True))
    assert sorted(validated.train_dataset.paths + validated.eval_dataset.paths) == sorted(plain.train_dataset.paths)
    assert set(validated.train_dataset.paths).isdisjoint(validated.eval_dataset.paths)
    assert sorted(p.parent.name for p in validated.eval_dataset.paths) == ["a"] * 4 + ["b"] * 2 + ["c"] * 2


def test_split_options_refused(vit, tmp_path):
    data = write_classes(tmp_path / "data", {"a": 4, "b": 1})
    with pytest.raises(DataError, match=r"--eval-fraction: 1\.0 is not between 0 and 1"):
        prepare(options(vit, data, fraction=1.0))
    with pytest.raises(DataError, match="--eval-fraction: cannot split 5 images of 2 classes"):
        prepare(options(vit, data, fraction=0.4))


@pytest.mark.parametrize(
    "classes, message",
    [({"cat": 1, "dog": 1}, "no folder for class owl"), ({"cat": 1, "dog": 1, "owl": 1, "emu": 1}, "class emu not in")],
)
def test_eval_folder_needs_the_training_classes(vit, folders, tmp_path, classes, message):
    evaluation = write_classes(tmp_path / "eval", classes)
    with pytest.raises(DataError, match=f"--eval-data: .*{message}"):
        prepare(options(vit, folders[0], evaluation))


def test_bad_folders_refused(vit, tmp_path):
    with pytest.raises(DataError, match=r"--data: .* has only 'cat' as class sub-folders; .* at least 2"):
        prepare(options(vit, write_classes(tmp_path / "one", {"cat": 3})))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    write_images(tmp_path / "empty" / "b", 2)
    with pytest.raises(DataError, match="--data: class folder .*empty/a has no images"):
        prepare(options(vit, tmp_path / "empty"))
    with pytest.raises(DataError, match="--data: no such directory"):
        prepare(options(vit, tmp_path / "absent"))


def test_unreadable_image_refused_by_name(vit, tmp_path):
    data = write_classes(tmp_path / "data", {"a": 2, "b": 2})
    (data / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"--data: .*b/broken\.png is not a readable image"):
        prepare(options(vit, data))
    (data / "b" / "broken.png").unlink()
    good = (data / "a" / "img000.png").read_bytes()
    (data / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"truncated\.png is not a readable image"):
        prepare(options(vit, data))
    (data / "a" / "truncated.png").unlink()
    (data / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt is not an image file; accepted suffixes: .*\.jpg.*\.png"):
        prepare(options(vit, data))


def test_file_damaged_after_prepare_named_when_loaded(vit, tmp_path):
    data = write_classes(tmp_path / "data", {"a": 2, "b": 2})
    task = prepare(options(vit, data, data))
    task.train_dataset.paths[0].write_bytes(b"gone")
    with pytest.raises(DataError, match=f"{task.train_dataset.paths[0].name}: cannot read the image"):
        task.train_dataset[0]


def test_model_folder_checks(vit, folders, tmp_path):
    with pytest.raises(DataError, match=r"--model: image classification needs a local image model folder \(config"):
        prepare(options(None, folders[0]))
    no_processor = shutil.copytree(vit, tmp_path / "no_processor")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(DataError, match="--model: .*no_processor has no preprocessor_config.json"):
        prepare(options(no_processor, folders[0]))
    text_model = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(text_model)
    shutil.copy(vit / "preprocessor_config.json", text_model)
    with pytest.raises(DataError, match="--model: .*bert is a 'bert' model, which transformers has no image-class"):
        prepare(options(text_model, folders[0]))


def test_build_model_gives_a_new_head_for_the_classes(task, vit):
    assert transformers.AutoConfig.from_pretrained(vit).num_labels == 2
    torch.manual_seed(0)
    model = task.build_model()
    assert isinstance(model, transformers.ViTForImageClassification)
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    # The body is the saved one.
    saved = transformers.ViTForImageClassification.from_pretrained(vit).state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items() if key.startswith("vit."))


@pytest.mark.parametrize(
    "model_type, architecture",
    [
        ("vit", "ViTForImageClassification"),
        ("deit", "DeiTForImageClassificationWithTeacher"),
        ("levit", "LevitForImageClassificationWithTeacher"),
        ("imagegpt", "ImageGPTForImageClassification"),
        ("siglip", "SiglipForImageClassification"),
    ],
)
def test_head_modules_name_exactly_the_new_heads(model_type, architecture):
    # peft's modules_to_save matches module names by suffix: every head must match, nothing else may.
    config = transformers.AutoConfig.for_model(model_type, num_labels=7)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(config)
    heads = {name.split(".")[0] for name, p in model.named_parameters() if p.shape[0] == 7}
    matched = {name for name, _ in model.named_modules() if name.endswith(ImageClassificationTask.head_modules)}
    assert heads and matched == heads


def test_compute_metrics_accuracy_and_macro_f1(task):
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    logits = np.eye(3)[predicted] + 0.1
    # Per-class F1 = 2 TP / (predicted + actual): 2/4, 4/5, 2/3.
    expected = {"accuracy": 4 / 6, "f1": (1 / 2 + 4 / 5 + 2 / 3) / 3}
    assert task.compute_metrics(logits, labels) == pytest.approx(expected)
    assert task.compute_metrics((logits, logits[:, ::-1]), labels) == pytest.approx(expected)
    # A class absent from labels and predictions counts as F1 0.
    task_of_four = ImageClassificationTask(**{**task.__dict__, "label_names": ["a", "b", "c", "d"]})
    assert task_of_four.compute_metrics(logits, labels)["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 4)


def test_trainer_trains_and_predicts(task, tmp_path, one_thread):
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=task.build_model(),
        args=args,
        train_dataset=task.train_dataset,
        data_collator=task.collator,
        processing_class=task.processor,
    )
    assert np.isfinite(trainer.train().training_loss)
    output = trainer.predict(task.eval_dataset)
    assert output.predictions.shape == (6, 3)
    assert output.label_ids.tolist() == task.eval_dataset.labels
    metrics = task.compute_metrics(output.predictions, output.label_ids)
    assert set(metrics) == set(task.metric_names) and all(0.0 <= value <= 1.0 for value in metrics.values())


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(f">i{array.ndim}i", magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_folders_script(tmp_path):
    script = load_script("fashion_mnist_folders")
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    splits = {"train": 3, "t10k": 2}  # images per class in each file
    images = {}
    for prefix, per_class in splits.items():
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images[prefix] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images[prefix], 2051)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    out = tmp_path / "out"
    script.main([str(out), "--per-class", "2", "--test-per-class", "5", "--source", str(source)])
    for split, per_class in (("train", 2), ("test", 2)):  # the test file holds only 2 per class
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(script.CLASSES)
        assert all(len(list((out / split / name).glob("*.png"))) == per_class for name in folders)
    first = sorted((out / "train" / "bag").glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), images["train"][int(first.stem)])
    with pytest.raises(SystemExit):  # never mixes into an earlier output
        script.main([str(out), "--source", str(source)])
    write_idx(source / "train-labels-idx1-ubyte.gz", np.zeros(30), 2051)
    with pytest.raises(SystemExit, match="magic number 2051, expected 2049"):
        script.main([str(tmp_path / "again"), "--source", str(source)])


def test_make_vit_script_gives_a_model_the_task_takes(tmp_path, folders):
    script = load_script("make_vit")
    model = tmp_path / "vit"
    script.main([str(model), "--image-size", "16", "--hidden", "32", "--layers", "1", "--heads", "2"])
    task = prepare(options(model, *folders))
    assert task.train_dataset[0]["pixel_values"].shape == (3, 16, 16)
    assert task.build_model().config.num_hidden_layers == 1
