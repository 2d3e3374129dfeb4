"""Image classification for `slimfit finetune --task image-classification`: class folders of images.

``--data`` is a folder with one sub-folder per class (the folder names, sorted, are the labels) holding image files;
``--eval-data`` is another such folder with the same classes, or ``--eval-fraction`` splits a stratified share off
``--data``. ``--model`` is a local Hugging Face image model folder: config.json of a model type transformers has an
image-classification head for, and preprocessor_config.json for its image processor.

Images are checked when the task is prepared but decoded only when a batch needs them: each dataset item is read,
converted to RGB and run through the model's image processor in ``__getitem__``, so memory holds paths, not pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from slimfit.data import DataError
from slimfit.tasks.base import (
    Task,
    classification_metrics,
    first_line,
    quiet_transformers,
    require_model_folder,
    validation_instead,
)

# Formats every Pillow build reads (WebP needs libwebp, which Pillow's wheels include); others are refused by name so
# that a typo or an unsupported format (HEIC, SVG, RAW) is not silently skipped.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
IMAGE_MODEL = "a local image model folder (config.json + preprocessor_config.json)"


@dataclass(frozen=True)
class ImageFolder:
    """Image files with integer labels; ``label_names[i]`` is the class folder of label ``i``."""

    paths: list[Path]
    labels: list[int]
    label_names: list[str]


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) pairs; an item is the image loaded, converted to RGB and processed on demand."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], processor: Any) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_rgb(self.paths[index])
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "labels": self.labels[index]}


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` upright (EXIF orientation applied) in RGB; alpha is dropped, grey is repeated."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            # Palette images may carry transparency; through RGBA, Pillow converts them without a warning.
            if image.mode == "P":
                image = image.convert("RGBA")
            return image.convert("RGB")
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad files
        raise DataError(f"{path}: cannot read the image ({first_line(error)})") from error


@dataclass
class ImageClassificationTask(Task):
    """Class folders of images for an ``AutoModelForImageClassification`` model."""

    name: ClassVar[str] = "image-classification"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    lora_task_type: ClassVar[str | None] = None
    # The new-head attributes of transformers' image classifiers: `classifier` for nearly all (ViT, DeiT, Swin,
    # ConvNeXT, ResNet...), `cls_classifier` + `distillation_classifier` (DeiT with teacher), `classifier_distill`
    # (LeViT with teacher), `score` (ImageGPT). Left out: `head`/`dist_head` (SwiftFormer, PP-LCNet) and `fc`
    # (HGNet-V2, TextNet), because peft matches names as suffixes and those also name SigLIP's pooling head and
    # ImageGPT's MLP layers (`c_fc`).
    head_modules: ClassVar[tuple[str, ...]] = (
        "classifier",
        "cls_classifier",
        "distillation_classifier",
        "classifier_distill",
        "score",
    )
    new_head = head_modules

    def build_model(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        names = self.label_names or []
        # A head sized for another label count is re-initialised (ignore_mismatched_sizes); its load report is noise.
        with quiet_transformers():
            saved = AutoConfig.from_pretrained(self.model_path)
            model = AutoModelForImageClassification.from_pretrained(
                self.model_path,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                ignore_mismatched_sizes=True,
            )
        if saved.num_labels == len(names) and list(saved.id2label.values()) != names:
            # A head of the right size trained for other classes (e.g. a model fine-tuned by `slimfit finetune` on
            # other data) is new too, initialised as transformers initialises a mismatched one: by clearing the
            # flags that mark its weights as loaded.
            heads = [module for name, module in model.named_children() if name in self.head_modules]
            for head in heads:
                for tensor in [*head.modules(), *head.parameters()]:
                    tensor._is_hf_initialized = False
            model.initialize_weights()
        return model

    def compute_metrics(self, predictions: np.ndarray | tuple[np.ndarray, ...], label_ids: Any) -> dict[str, float]:
        # DeiT with a teacher returns averaged, class-token and distillation logits; the first are the prediction.
        return classification_metrics(predictions, label_ids, len(self.label_names or []))

    def describe(self) -> str:
        classes = len(self.label_names or [])
        return f"{self.examples.get('train', 0)} train / {self.examples.get('eval', 0)} eval images, {classes} classes"


def prepare(config: Any) -> ImageClassificationTask:
    """Check the model folder, scan and verify the class folders, split them; images are decoded lazily.

    Uses ``config.model``, ``config.data``, ``config.eval_data``, ``config.eval_fraction`` and ``config.seed``.
    """
    from transformers import default_data_collator

    if config.model is None:
        raise DataError(f"--model: image classification needs {IMAGE_MODEL}")
    model_path = Path(config.model)
    processor = load_processor(model_path)
    if config.data is None:
        raise DataError("--data: image classification needs a folder with one sub-folder of images per class")
    data = scan_folder(Path(config.data), "--data")
    if config.eval_data:
        evaluation = scan_folder(Path(config.eval_data), "--eval-data", expected=data.label_names)
        train = data
    else:
        train, evaluation = stratified_split(data, config.eval_fraction, config.seed)
    train, evaluation = validation_instead(train, evaluation, stratified_split, config)
    return ImageClassificationTask(
        model_path=model_path,
        model_name=str(config.model),
        train_dataset=ImageDataset(train.paths, train.labels, processor),
        eval_dataset=ImageDataset(evaluation.paths, evaluation.labels, processor),
        collator=default_data_collator,  # stacks the pixel tensors, makes the int labels a long tensor
        processor=processor,
        label_names=data.label_names,
        examples={"train": len(train.paths), "eval": len(evaluation.paths)},
    )


def load_processor(model_path: Path) -> Any:
    """The image processor of a model folder whose config has an image-classification head (else DataError)."""
    require_model_folder(model_path)
    if not (model_path / "preprocessor_config.json").is_file():
        raise DataError(f"--model: {model_path} has no preprocessor_config.json; expected {IMAGE_MODEL}")
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    with quiet_transformers():
        try:
            model_config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError) as error:
            raise DataError(f"--model: cannot read {model_path}/config.json: {first_line(error)}") from error
        if type(model_config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
            raise DataError(
                f"--model: {model_path} is a {model_config.model_type!r} model, which transformers has no "
                "image-classification head for (AutoModelForImageClassification: ViT, DeiT, Swin, ConvNeXT, ...)"
            )
        if model_config.problem_type not in (None, "single_label_classification"):
            raise DataError(
                f"--model: {model_path}/config.json sets problem_type={model_config.problem_type!r}; image "
                "classification trains one label per image (remove problem_type or use another model)"
            )
        channels = getattr(model_config, "num_channels", 3)
        if channels != 3:
            raise DataError(f"--model: {model_path} takes {channels}-channel images; images are loaded as RGB (3)")
        try:
            return AutoImageProcessor.from_pretrained(model_path)
        except (OSError, ValueError) as error:
            raise DataError(f"--model: cannot load the image processor of {model_path}: {first_line(error)}") from error


def scan_folder(root: Path, option: str, expected: Sequence[str] | None = None) -> ImageFolder:
    """Image files of the class sub-folders of ``root``, each verified; hidden files and folders are ignored.

    ``expected``: the training classes (sorted), which ``root`` must have exactly.
    """
    if not root.is_dir():
        raise DataError(
            f"{option}: no such directory: {root} (expected a folder with one sub-folder of images per class)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if expected is not None:
        missing, extra = sorted(set(expected) - set(classes)), sorted(set(classes) - set(expected))
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"no folder for class {', '.join(missing)}")
            if extra:
                problems.append(f"class {', '.join(extra)} not in the training data")
            raise DataError(f"{option}: {root}: {'; '.join(problems)} (training classes: {', '.join(expected)})")
    elif len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"{option}: {root} has {found} as class sub-folders; classification needs at least 2")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"{option}: class folder {root / name} has no images")
        for file in files:
            verify_image(file, option)
        paths += files
        labels += [label] * len(files)
    return ImageFolder(paths, labels, classes)


def verify_image(path: Path, option: str) -> None:
    """Refuse a file with another suffix, or one Pillow cannot parse.

    ``Image.verify`` reads the headers and, for PNG, every chunk with its checksum, without decoding pixels: it finds
    truncated and non-image files at a fraction of a full decode's cost (which dominates for large photos). Damage it
    cannot see surfaces as a DataError naming the file when :func:`load_rgb` decodes it.
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            f"{option}: {path} is not an image file; accepted suffixes: {', '.join(IMAGE_SUFFIXES)} (remove it)"
        )
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad files
        raise DataError(f"{option}: {path} is not a readable image ({first_line(error)})") from error


def stratified_split(data: ImageFolder, eval_fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
    """(train, eval) with the class proportions of ``data``, shuffled; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"--eval-fraction: {eval_fraction} is not between 0 and 1 (exclusive)")
    try:
        train_idx, eval_idx = train_test_split(
            np.arange(len(data.paths)), test_size=eval_fraction, stratify=data.labels, random_state=seed
        )
    except ValueError as error:  # a class with one image, or fewer eval images than classes
        raise DataError(
            f"--eval-fraction: cannot split {len(data.paths)} images of {len(data.label_names)} classes "
            f"with {eval_fraction} ({first_line(error)}); add images, raise it, or pass --eval-data"
        ) from error

    def subset(indices: np.ndarray) -> ImageFolder:
        return ImageFolder([data.paths[i] for i in indices], [data.labels[i] for i in indices], data.label_names)

    return subset(train_idx), subset(eval_idx)
