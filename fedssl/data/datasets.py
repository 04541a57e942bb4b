"""Image datasets held whole in memory as uint8 tensors: CIFAR-10/100, Fashion-MNIST, image folders, synthetic.

``load_split(name, split, data_dir)`` returns an :class:`ImageData` with
``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64. Official files are read
in their own formats (CIFAR "python version" pickles, Fashion-MNIST IDX) and
downloaded from the official sources when missing; every problem a user can
fix (no network, a corrupt file, an empty folder) raises :class:`DataError`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedssl.errors import ConfigError, DataError

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_DEFAULT_SIZE = 64  # side every imagefolder image is resized to when image_size is not given
IMAGEFOLDER_TEST_FRACTION = 0.1
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_RESIZE_CHUNK = 512  # images resized per interpolate call, bounds the float intermediate


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its name, shape, classes and normalisation statistics.

    In :data:`DATASETS` ``image_size`` is the native side; in a loaded
    :class:`ImageData` it is the side of the images actually held (after any resize).
    """

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageData:
    """One split held in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},) int64, got {tuple(self.labels.shape)} {self.labels.dtype}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor) -> ImageData:
        """The samples at ``indices`` (in that order), sharing ``info``."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.int64)  # (M,)
        return ImageData(self.images[index], self.labels[index], self.info)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,)),
    # num_classes 0: known only once the folder is read; image_size: the default resize target.
    "imagefolder": DatasetInfo("imagefolder", 3, IMAGEFOLDER_DEFAULT_SIZE, 0, _IMAGENET_MEAN, _IMAGENET_STD),
    # mean/std measured on 20,000 synthetic images.
    "synthetic": DatasetInfo("synthetic", 3, 32, 10, (0.3182, 0.3485, 0.3237), (0.2612, 0.2773, 0.2656)),
}


def default_cache_dir() -> Path:
    """Where datasets live when no ``data_dir`` is given: ``$FEDSSL_DATA_DIR`` or ``~/.cache/fedssl/data``."""
    env = os.environ.get("FEDSSL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedssl" / "data"


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
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer (got {image_size!r}): pass e.g. image_size=32")
    root = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    info = DATASETS[name]
    if name in ("cifar10", "cifar100"):
        data = _load_cifar(name, split, root, download)
    elif name == "fashion-mnist":
        data = _load_fashion_mnist(split, root, download)
    elif name == "imagefolder":
        if data_dir is None:
            raise DataError("the imagefolder dataset needs a folder: pass --set data_dir=DIR with one sub-folder of images per class")
        return _load_imagefolder(split, root, image_size or IMAGEFOLDER_DEFAULT_SIZE, seed)
    else:
        return _make_synthetic(split, synthetic_size, image_size or info.image_size, seed)
    return resize_images(data, image_size) if image_size is not None else data


def resize_images(data: ImageData, size: int) -> ImageData:
    """``data`` with every image resized to (size, size): bilinear, antialiased, rounded back to uint8."""
    images = data.images  # (N, C, H, W) uint8
    if images.shape[-2:] == (size, size):
        return data
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)  # (N, C, S, S)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return ImageData(out, data.labels, dataclasses.replace(data.info, image_size=size))


# --------------------------------------------------------------------------- downloads

_open_url: Callable[..., object] = urllib.request.urlopen  # tests replace this to simulate the network


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, missing: str, fix: str) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file, MD5 check, ``os.replace``).

    ``missing`` says what was not found (``"cifar10 not found in /x"``) and ``fix``
    what the user can do instead; both go into the error when the download fails.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"{missing} and {dest.parent} is not writable for the download ({err}): {fix}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _open_url(url, timeout=60) as response:  # type: ignore[attr-defined]
            shutil.copyfileobj(response, out, 1 << 20)
        got = _md5(tmp)
        if got != md5:
            raise DataError(f"{missing} and the download of {url} has MD5 {got}, not {md5} (truncated or tampered): retry, or {fix}")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts and resets are OSErrors
        raise DataError(f"{missing} and the download of {url} failed ({_reason(err)}): {fix}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason) or type(err).__name__


def _extract_tar(archive: Path, member: str, root: Path) -> Path:
    """Extract ``archive`` into a temp folder, then move its top folder ``member`` to ``root/member``."""
    target = root / member
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract.") as tmp:
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse absolute paths and links out
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"{archive} is not a valid tar.gz archive ({err}): delete it so it is downloaded again") from err
        extracted = Path(tmp) / member
        if not extracted.is_dir():
            raise DataError(f"{archive} has no {member}/ folder: delete it so the official archive is downloaded again")
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # else another process extracted it first: use that
                raise
    return target


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSource:
    folder: str
    url: str
    md5: str
    label_key: bytes
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]


_CIFAR = {
    "cifar10": _CifarSource(
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        b"labels",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
    ),
    "cifar100": _CifarSource(
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


def _load_cifar(name: str, split: str, root: Path, download: bool) -> ImageData:
    source, info = _CIFAR[name], DATASETS[name]
    folder = _find_named_folder(root, source.folder)
    if folder is None:
        fix = f"pass --set data_dir=DIR with a folder that holds {source.folder}"
        if not download:
            raise DataError(f"{info.name} not found in {root} and download is off: {fix}, or allow the download")
        missing = f"{info.name} not found in {root}"
        archive = download_file(source.url, root / Path(source.url).name, source.md5, missing, fix)
        folder = _extract_tar(archive, source.folder, root)
        archive.unlink(missing_ok=True)
    files = source.train_files if split == "train" else source.test_files
    batches = [_read_cifar_batch(folder / f, source.label_key, info.num_classes) for f in files]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))  # (N, 3, 32, 32) uint8
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))  # (N,) int64
    return ImageData(images, labels, dataclasses.replace(info, class_names=_cifar_class_names(folder, name)))


def _cifar_class_names(folder: Path, name: str) -> tuple[str, ...]:
    meta_file, key = ("batches.meta", b"label_names") if name == "cifar10" else ("meta", b"fine_label_names")
    if not (folder / meta_file).is_file():
        return ()  # names are a convenience: the images and labels are complete without them
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _read_pickle(folder / meta_file).get(key, ()))


# --------------------------------------------------------------------------- Fashion-MNIST

_FASHION_FILES = {
    # split: ((images file, md5 of the official .gz), (labels file, md5))
    "train": (("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"), ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe")),
    "test": (("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"), ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310")),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


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
    for folder in dirs:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_fashion_mnist(split: str, root: Path, download: bool) -> ImageData:
    info = DATASETS["fashion-mnist"]
    search = [root / "fashion-mnist", root, FASHION_MNIST_SYSTEM_DIR]
    fix = "pass --set data_dir=DIR with a folder that holds the Fashion-MNIST *-idx*-ubyte.gz files (or apt-get install dataset-fashion-mnist)"
    paths = []
    for stem, md5 in _FASHION_FILES[split]:
        path = _find_idx(search, stem)
        if path is None:
            if not download:
                raise DataError(f"Fashion-MNIST file {stem} not found in {root} and download is off: {fix}")
            missing = f"Fashion-MNIST file {stem} not found in {root}"
            path = download_file(FASHION_MNIST_URL + f"{stem}.gz", root / "fashion-mnist" / f"{stem}.gz", md5, missing, fix)
        paths.append(path)
    images = read_idx(paths[0], 3)  # (N, 28, 28) uint8
    labels = read_idx(paths[1], 1).astype(np.int64)  # (N,)
    if len(images) != len(labels) or (labels.size and labels.max() >= info.num_classes):
        raise DataError(f"{paths[0]} and {paths[1]} do not match ({len(images)} images, {len(labels)} labels up to {labels.max(initial=0)}): {fix}")
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        torch.from_numpy(labels),
        dataclasses.replace(info, class_names=FASHION_MNIST_CLASSES),
    )


# --------------------------------------------------------------------------- image folders


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


def _load_imagefolder(split: str, root: Path, size: int, seed: int) -> ImageData:
    """``root/<class>/*.png`` (or ``root/{train,test}/<class>/*``) -> images (N, 3, size, size)."""
    fix = f"put images in {root}/<class>/ (or {root}/train/<class>/ and {root}/test/<class>/)"
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: {fix}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names = list(_class_images(root / "train"))
        per_class = _class_images(root / split)
        unknown = sorted(set(per_class) - set(class_names))
        if unknown:
            raise DataError(f"{root / 'test'} has classes {unknown} that {root / 'train'} lacks: add training images for them or remove them")
    else:
        all_classes = _class_images(root)
        class_names = list(all_classes)
        per_class = _split_files(all_classes, split, seed)
    if not class_names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: {fix}")
    files = [(f, class_names.index(name)) for name, fs in per_class.items() for f in fs]
    if not files:
        raise DataError(f"the {split} split of {root} holds no images: {fix}")
    images = torch.from_numpy(np.stack([_read_image(f, size) for f, _ in files]))  # (N, 3, S, S) uint8
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)  # (N,)
    info = dataclasses.replace(DATASETS["imagefolder"], image_size=size, num_classes=len(class_names), class_names=tuple(class_names))
    return ImageData(images, labels, info)


# --------------------------------------------------------------------------- synthetic


def _make_synthetic(split: str, n: int, size: int, seed: int) -> ImageData:
    """``n`` images of 10 classes: class-oriented coloured stripes plus a blob, random offsets and noise.

    Class ``c`` fixes the stripe angle (c * 18 degrees) and colour; each image draws its own
    phase, frequency jitter, blob position and noise, so views of one image share structure
    that SSL can learn while the class stays recoverable. Train and test use different sub-seeds.
    """
    if n < 1:
        raise ConfigError(f"synthetic_size must be >= 1 (got {n}): pass e.g. synthetic_size=512")
    num_classes = DATASETS["synthetic"].num_classes
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % num_classes)  # (N,) balanced
    palette = np.random.default_rng(1234).uniform(0.2, 1.0, size=(num_classes, 3))  # (10, 3) fixed class colours
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")  # (S, S)
    angle = labels * np.pi / num_classes + rng.normal(0, 0.05, n)  # (N,)
    freq = rng.uniform(3.0, 5.0, n)  # stripes per image side
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]  # (N, S, S)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    cy, cx = rng.uniform(0.2, 0.8, (2, n))
    blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 0.02)  # (N, S, S)
    colour = palette[labels][:, :, None, None]  # (N, 3, 1, 1)
    images = stripes[:, None] * colour + blob[:, None] * (1 - colour) + rng.normal(0, 0.08, (n, 3, size, size))
    images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)  # (N, 3, S, S)
    info = dataclasses.replace(DATASETS["synthetic"], image_size=size)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), info)
