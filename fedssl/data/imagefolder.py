"""Your own images: ``root/<class>/*.png`` (or ``root/{train,test}/<class>/*``), resized and centre-cropped.

Without train/ and test/ sub-folders a seeded 10% of each class is the test split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fedssl.data.images import DatasetInfo, ImageData
from fedssl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_DEFAULT_SIZE = 64  # side every imagefolder image is resized to when image_size is not given
IMAGEFOLDER_TEST_FRACTION = 0.1
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# num_classes 0: known only once the folder is read; image_size: the default resize target.
IMAGEFOLDER_INFO = DatasetInfo("imagefolder", 3, IMAGEFOLDER_DEFAULT_SIZE, 0, _IMAGENET_MEAN, _IMAGENET_STD)


def _class_images(folder: Path) -> dict[str, list[Path]]:
    """Sorted class name -> sorted image files, for the sub-folders of ``folder`` that hold images."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes[sub.name] = files
    return classes


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file -> (3, size, size) uint8: shorter side resized to ``size``, then centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err}): delete or replace it") from err


def _split_files(classes: dict[str, list[Path]], split: str, seed: int) -> dict[str, list[Path]]:
    """Deterministic per-class split: a seeded 10% of each class (at least 1 of 2+) is the test split."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for name, files in classes.items():
        n_test = max(1, round(IMAGEFOLDER_TEST_FRACTION * len(files))) if len(files) >= 2 else 0
        is_test = np.zeros(len(files), dtype=bool)
        is_test[rng.permutation(len(files))[:n_test]] = True
        keep = is_test if split == "test" else ~is_test
        chosen[name] = [f for f, k in zip(files, keep) if k]
    return chosen


def _split_classes(root: Path, split: str, seed: int) -> tuple[list[str], dict[str, list[Path]]]:
    """(every class name, the image files of ``split`` per class), from train/ + test/ or one seeded split."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names = list(_class_images(root / "train"))
        per_class = _class_images(root / split)
        unknown = sorted(set(per_class) - set(class_names))
        if unknown:
            raise DataError(f"{root / 'test'} has classes {unknown} that {root / 'train'} lacks: add training images for them or remove them")
        return class_names, per_class
    all_classes = _class_images(root)
    return list(all_classes), _split_files(all_classes, split, seed)


def load_imagefolder(split: str, root: Path, size: int, seed: int) -> ImageData:
    """``root/<class>/*.png`` (or ``root/{train,test}/<class>/*``) -> images (N, 3, size, size)."""
    fix = f"put images in {root}/<class>/ (or {root}/train/<class>/ and {root}/test/<class>/)"
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: {fix}")
    class_names, per_class = _split_classes(root, split, seed)
    if not class_names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: {fix}")
    files = [(f, class_names.index(name)) for name, fs in per_class.items() for f in fs]
    if not files:
        raise DataError(f"the {split} split of {root} holds no images: {fix}")
    images = torch.from_numpy(np.stack([_read_image(f, size) for f, _ in files]))  # (N, 3, S, S) uint8
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)  # (N,)
    info = dataclasses.replace(IMAGEFOLDER_INFO, image_size=size, num_classes=len(class_names), class_names=tuple(class_names))
    return ImageData(images, labels, info)
