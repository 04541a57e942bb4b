"""CIFAR-10 and CIFAR-100 from the official "python version" archives, read without running pickled code.

:func:`load_cifar` finds ``cifar-10-batches-py`` / ``cifar-100-python`` under a root (or is
given the folder itself), downloads and extracts the official archive when it is missing, and
reads the pickled batches with an unpickler that admits numpy arrays only.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedssl.data.download import OpenUrl, download_file, extract_tar
from fedssl.data.images import DatasetInfo, ImageData
from fedssl.errors import DataError

CIFAR_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR variant comes from and how its batches are laid out."""

    folder: str
    url: str
    md5: str
    label_key: bytes
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]


CIFAR_SOURCES: dict[str, CifarSource] = {  # read at every load: a test may swap an entry
    "cifar10": CifarSource(
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        b"labels",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
    ),
    "cifar100": CifarSource(
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        b"fine_labels",
        ("train",),
        ("test",),
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays) and refuses any other global: no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    """The dict pickled in ``path`` (numpy contents only); a missing or foreign file raises DataError."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as err:
        raise DataError(f"{path} is missing: delete {path.parent} so it is downloaded again, or point data_dir at a complete copy") from err
    except Exception as err:  # any unpickling failure means a damaged or foreign file
        raise DataError(f"{path} is not a valid CIFAR pickle ({type(err).__name__}: {err}): delete {path.parent} so it is downloaded again") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a valid CIFAR pickle (no dict inside): delete {path.parent} so it is downloaded again")
    return obj


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images (N, 3, 32, 32) uint8, labels (N,) int64."""
    batch = _read_pickle(path)
    fix = f"delete {path.parent} so it is downloaded again"
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR batch: {fix}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{path} holds data of shape {data.shape} {data.dtype} with {labels.size} labels, not (N, 3072) uint8: {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}: {fix}")
    return data.reshape(-1, 3, 32, 32), labels  # channel-major rows


def _find_named_folder(root: Path, folder: str) -> Path | None:
    """``root/folder`` or ``root`` itself when it is that folder."""
    if root.name == folder and root.is_dir():
        return root
    return root / folder if (root / folder).is_dir() else None


def _cifar_folder(name: str, root: Path, download: bool, open_url: OpenUrl) -> Path:
    """The extracted batches folder of ``name`` under ``root``: found, or downloaded and extracted there."""
    source, info = CIFAR_SOURCES[name], CIFAR_INFO[name]
    folder = _find_named_folder(root, source.folder)
    if folder is not None:
        return folder
    fix = f"pass --set data_dir=DIR with a folder that holds {source.folder}"
    if not download:
        raise DataError(f"{info.name} not found in {root} and download is off: {fix}, or allow the download")
    missing = f"{info.name} not found in {root}"
    archive = download_file(source.url, root / Path(source.url).name, source.md5, missing, fix, open_url=open_url)
    folder = extract_tar(archive, source.folder, root)
    archive.unlink(missing_ok=True)
    return folder


def load_cifar(name: str, split: str, root: Path, download: bool, *, open_url: OpenUrl) -> ImageData:
    """One split of ``cifar10`` / ``cifar100`` -> images (N, 3, 32, 32) uint8, labels (N,) int64."""
    source, info = CIFAR_SOURCES[name], CIFAR_INFO[name]
    folder = _cifar_folder(name, root, download, open_url)
    files = source.train_files if split == "train" else source.test_files
    batches = [_read_cifar_batch(folder / f, source.label_key, info.num_classes) for f in files]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))  # (N, 3, 32, 32) uint8
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))  # (N,) int64
    return ImageData(images, labels, dataclasses.replace(info, class_names=_cifar_class_names(folder, name)))


def _cifar_class_names(folder: Path, name: str) -> tuple[str, ...]:
    """The class names of the batches' meta file; () when it is absent."""
    meta_file, key = ("batches.meta", b"label_names") if name == "cifar10" else ("meta", b"fine_label_names")
    if not (folder / meta_file).is_file():
        return ()  # names are a convenience: the images and labels are complete without them
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _read_pickle(folder / meta_file).get(key, ()))
