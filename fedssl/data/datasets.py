"""Image datasets held whole in memory as uint8 tensors: the registry and :func:`load_split`, the one entry point.

``load_split(name, split, data_dir)`` returns an :class:`ImageData` with
``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64. Official files are read
in their own formats (CIFAR "python version" pickles, Fashion-MNIST IDX) and
downloaded from the official sources when missing; every problem a user can
fix (no network, a corrupt file, an empty folder) raises :class:`DataError`.

Each loader lives in its own module and this one dispatches to it: ``images.py`` (the
types the loaders return, resizing), ``download.py`` (MD5-checked downloads, tar
extraction), ``cifar.py``, ``fashion_mnist.py``, ``imagefolder.py``, ``synthetic.py``.
Their public names are re-exported here, where the rest of fedssl imports them from.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from fedssl.data.cifar import CIFAR_INFO, load_cifar
from fedssl.data.cifar import CIFAR_SOURCES as _CIFAR  # noqa: F401 (tests swap a source's MD5 here)
from fedssl.data.download import OpenUrl, download_file  # noqa: F401 (re-exported)
from fedssl.data.download import md5_of as _md5  # noqa: F401 (tests checksum their fake archives with it)
from fedssl.data.fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_INFO,  # noqa: F401 (re-exported)
                                       FASHION_MNIST_SYSTEM_DIR, FASHION_MNIST_URL, load_fashion_mnist, read_idx)
from fedssl.data.imagefolder import (IMAGE_EXTENSIONS, IMAGEFOLDER_DEFAULT_SIZE,  # noqa: F401 (re-exported)
                                     IMAGEFOLDER_INFO, IMAGEFOLDER_TEST_FRACTION, load_imagefolder)
from fedssl.data.images import SPLITS, DatasetInfo, ImageData, resize_images  # noqa: F401 (re-exported)
from fedssl.data.synthetic import SYNTHETIC_INFO, make_synthetic
from fedssl.errors import ConfigError, DataError

DATASETS: dict[str, DatasetInfo] = {
    **CIFAR_INFO,
    "fashion-mnist": FASHION_MNIST_INFO,
    "imagefolder": IMAGEFOLDER_INFO,
    "synthetic": SYNTHETIC_INFO,
}

# The outside world the loaders reach, read at every load so that tests can replace them here.
_open_url: OpenUrl = urllib.request.urlopen  # the network
# FASHION_MNIST_SYSTEM_DIR (imported above): the system folder searched for Fashion-MNIST


def default_cache_dir() -> Path:
    """Where datasets live when no ``data_dir`` is given: ``$FEDSSL_DATA_DIR`` or ``~/.cache/fedssl/data``."""
    env = os.environ.get("FEDSSL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedssl" / "data"


def _check_request(name: str, split: str, image_size: int | None) -> None:
    """ConfigError for an unknown dataset or split, or an image_size that is not a positive integer."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer (got {image_size!r}): pass e.g. image_size=32")


def load_split(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    image_size: int | None = None,
    download: bool = True,
    synthetic_size: int = 512,
    seed: int = 0,
) -> ImageData:
    """Load one split of a dataset into memory.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder that holds (or receives) the dataset; default :func:`default_cache_dir`.
        image_size: resize every image to this side (bilinear, antialiased); for
            ``imagefolder`` the side all images are brought to (default 64).
        download: fetch missing official files (CIFAR, Fashion-MNIST).
        synthetic_size: number of images of the ``synthetic`` split.
        seed: seeds ``synthetic`` images and the ``imagefolder`` train/test split.
    Returns:
        images (N, C, S, S) uint8 and labels (N,) int64.
    """
    _check_request(name, split, image_size)
    root = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    if name in ("cifar10", "cifar100"):
        data = load_cifar(name, split, root, download, open_url=_open_url)
    elif name == "fashion-mnist":
        data = load_fashion_mnist(split, root, download, open_url=_open_url, system_dir=FASHION_MNIST_SYSTEM_DIR)
    elif name == "imagefolder":
        if data_dir is None:
            raise DataError("the imagefolder dataset needs a folder: pass --set data_dir=DIR with one sub-folder of images per class")
        return load_imagefolder(split, root, image_size or IMAGEFOLDER_DEFAULT_SIZE, seed)
    else:
        return make_synthetic(split, synthetic_size, image_size or DATASETS[name].image_size, seed)
    return resize_images(data, image_size) if image_size is not None else data
