"""A small ImageNet-style folder of PNGs for the image-folder tests: each class a colour and a stripe direction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def class_image(label: int, index: int, size: tuple[int, int] = (40, 40)) -> np.ndarray:
    """uint8 (H, W, 3): class ``label``'s colour, its stripes (horizontal, vertical, diagonal), noise of ``index``."""
    h, w = size
    y, x = np.mgrid[:h, :w]
    stripes = ((y, x, x + y)[label % 3] // 4) % 2  # (H, W) in {0, 1}
    noise = np.random.default_rng([label, index]).integers(-20, 21, (h, w, 3))
    return (np.array(COLOURS[label % 3]) * (0.6 + 0.4 * stripes[..., None]) + noise).clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 4) -> Path:
    """``root/train/class<c>/<i>.png`` and ``root/val/...``; every third image 40 x 32 (sizes differ)."""
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (40, 32) if i % 3 == 2 else (40, 40)
                Image.fromarray(class_image(c, i + (1000 if split == "val" else 0), size)).save(folder / f"{i}.png")
    return root
