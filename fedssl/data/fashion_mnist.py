"""Fashion-MNIST from its official IDX files (gzipped or not): found locally, else downloaded.

The files are looked for in ``root/fashion-mnist``, ``root`` and the system folder of Debian's
``dataset-fashion-mnist`` package; missing ones are downloaded to ``root/fashion-mnist``.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import torch

from fedssl.data.download import OpenUrl, download_file
from fedssl.data.images import DatasetInfo, ImageData
from fedssl.errors import DataError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_INFO = DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,))
_FASHION_FILES = {
    # split: ((images file, md5 of the official .gz), (labels file, md5))
    "train": (("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"), ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe")),
    "test": (("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"), ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310")),
}
_FIX = "pass --set data_dir=DIR with a folder that holds the Fashion-MNIST *-idx*-ubyte.gz files (or apt-get install dataset-fashion-mnist)"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or not) with ``ndim`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}): delete it so it is downloaded again") from err
    fix = f"delete {path} so it is downloaded again"
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is too short for an IDX header: {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:  # 0x00 0x00, type 0x08 (unsigned byte), ndim
        raise DataError(f"{path} has IDX magic number {magic:#010x}, expected {0x0800 + ndim:#010x}: {fix}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {body.size} bytes of data, its header says {shape}: {fix}")
    return body.reshape(shape)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    """The first ``stem`` or ``stem.gz`` file in ``dirs``, in order."""
    for folder in dirs:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_paths(split: str, root: Path, download: bool, system_dir: Path, open_url: OpenUrl) -> list[Path]:
    """[images file, labels file] of ``split``: found, or downloaded to ``root/fashion-mnist``."""
    search = [root / "fashion-mnist", root, system_dir]
    paths = []
    for stem, md5 in _FASHION_FILES[split]:
        path = _find_idx(search, stem)
        if path is None:
            if not download:
                raise DataError(f"Fashion-MNIST file {stem} not found in {root} and download is off: {_FIX}")
            missing = f"Fashion-MNIST file {stem} not found in {root}"
            path = download_file(FASHION_MNIST_URL + f"{stem}.gz", root / "fashion-mnist" / f"{stem}.gz", md5, missing,
                                 _FIX, open_url=open_url)
        paths.append(path)
    return paths


def load_fashion_mnist(split: str, root: Path, download: bool, *, open_url: OpenUrl,
                       system_dir: Path = FASHION_MNIST_SYSTEM_DIR) -> ImageData:
    """One split -> images (N, 1, 28, 28) uint8, labels (N,) int64."""
    info = FASHION_MNIST_INFO
    paths = _idx_paths(split, root, download, system_dir, open_url)
    images = read_idx(paths[0], 3)  # (N, 28, 28) uint8
    labels = read_idx(paths[1], 1).astype(np.int64)  # (N,)
    if len(images) != len(labels) or (labels.size and labels.max() >= info.num_classes):
        raise DataError(f"{paths[0]} and {paths[1]} do not match ({len(images)} images, {len(labels)} labels up to {labels.max(initial=0)}): {_FIX}")
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        torch.from_numpy(labels),
        dataclasses.replace(info, class_names=FASHION_MNIST_CLASSES),
    )
