"""A tiny randomly initialised ViT saved as a local image model folder, and class folders of small images.

Shared by the image-classification task tests and the command-line tests of every task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (mode, suffix) of the images written per class, in turn: PNG and JPEG, colour, grey, alpha and palette.
KINDS = [("RGB", ".png"), ("L", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".jpeg"), ("L", ".png")]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        mode, suffix = KINDS[i % len(KINDS)]
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"img{i:03d}{suffix}")


def write_classes(root: Path, counts: dict[str, int]) -> Path:
    for seed, (name, count) in enumerate(counts.items()):
        write_images(root / name, count, seed)
    return root


def save_vit(folder: Path, num_labels: int = 2) -> Path:
    """A 2-layer, hidden-32 ViT over 16 px images in 4 px patches, with its image processor."""
    import torch
    import transformers

    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
