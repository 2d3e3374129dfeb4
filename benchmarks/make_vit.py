"""Save a small, randomly initialised ViT with its image processor, for from-scratch image-classification runs.

Defaults fit Fashion-MNIST (benchmarks/fashion_mnist_folders.py): 28 px images in 4 px patches (7 x 7 = 49 tokens
and the class token), and the width of ViT-Tiny / DeiT-Tiny (hidden 192, 3 heads of 64, MLP 768) at half its depth
(6 layers): about 2.7 M parameters, which trains on a CPU in minutes. The processor resizes to the model's size and
normalises each RGB channel to [-1, 1]; grey images arrive as RGB (the task converts them).

Usage: python benchmarks/make_vit.py OUT [--image-size 28] [--patch-size 4] [--hidden 192] [--layers 6] [--heads 3]
then: slimfit finetune --task image-classification --model OUT --data ... (the head is sized to the data's classes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="model folder to write (config.json, weights, preprocessor_config.json)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
    )
    torch.manual_seed(args.seed)
    ViTForImageClassification(config).save_pretrained(args.out)
    size = {"height": args.image_size, "width": args.image_size}
    ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(args.out)
    print(f"{args.out}: ViT {args.layers} x {args.hidden}, {args.image_size} px in {args.patch_size} px patches")


if __name__ == "__main__":
    main()
