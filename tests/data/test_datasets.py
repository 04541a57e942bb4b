"""Dataset loaders: the real CIFAR-10 subset, downloads and their failures, image folders, synthetic, IDX."""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl.data import datasets as ds
from fedssl.data.datasets import DATASETS, ImageData, load_split
from fedssl.errors import ConfigError, DataError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")


# --------------------------------------------------------------------------- real CIFAR-10 subset


def test_cifar_subset_loads_unchanged(cifar_subset_dir: Path) -> None:
    train = load_split("cifar10", "train", cifar_subset_dir, download=False)
    test = load_split("cifar10", "test", cifar_subset_dir, download=False)
    assert train.images.shape == (5085, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1017, 3, 32, 32) and len(test) == 1017
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    assert train.info.class_names[0] == "airplane" and train.info.num_classes == 10
    with open(cifar_subset_dir / CIFAR_FOLDER / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    row = 1017 + 5  # 6th image of the second batch
    np.testing.assert_array_equal(train.images[row].numpy(), batch[b"data"][5].reshape(3, 32, 32))
    assert train.labels[row].item() == batch[b"labels"][5]


def test_cifar_folder_itself_accepted_and_subset(cifar_subset_dir: Path) -> None:
    test = load_split("cifar10", "test", cifar_subset_dir / CIFAR_FOLDER, download=False)
    part = test.subset(np.array([3, 1]))
    assert isinstance(part, ImageData) and len(part) == 2
    assert torch.equal(part.images[0], test.images[3]) and part.labels[1] == test.labels[1]


def test_cifar_resized_to_64(cifar_subset_dir: Path) -> None:
    native = load_split("cifar10", "test", cifar_subset_dir, download=False)
    big = load_split("cifar10", "test", cifar_subset_dir, image_size=64, download=False)
    assert big.images.shape == (1017, 3, 64, 64) and big.images.dtype == torch.uint8
    assert big.info.image_size == 64 and DATASETS["cifar10"].image_size == 32
    assert abs(big.images.float().mean() - native.images.float().mean()) < 1.0  # same content, resampled


# --------------------------------------------------------------------------- downloads and broken files


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network")


def test_missing_cifar_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "_open_url", _no_network)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz failed \(no network\).*data_dir=DIR.*cifar-10-batches-py"):
        load_split("cifar10", "train", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial download left behind
    with pytest.raises(DataError, match="download is off"):
        load_split("cifar100", "train", tmp_path, download=False)


def _fake_cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def _fake_cifar_tarball(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(CIFAR_FILES[:-1]):
            blob = pickle.dumps(_fake_cifar_batch(4, i))
            member = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    return path


def test_download_verifies_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _fake_cifar_tarball(tmp_path / "served.tar.gz")
    root = tmp_path / "data"
    monkeypatch.setattr(ds, "_open_url", lambda url, timeout: open(tarball, "rb"))
    with pytest.raises(DataError, match="MD5"):  # the official checksum does not match the fake archive
        load_split("cifar10", "train", root)
    assert not (root / CIFAR_FOLDER).exists() and list(root.iterdir()) == []
    monkeypatch.setitem(ds._CIFAR, "cifar10", dataclasses.replace(ds._CIFAR["cifar10"], md5=ds._md5(tarball)))
    train = load_split("cifar10", "train", root)
    assert train.images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(train.images[0].numpy().ravel(), _fake_cifar_batch(4, 0)[b"data"][0])
    assert sorted(p.name for p in root.iterdir()) == [CIFAR_FOLDER]  # archive removed after extraction


def _cifar_copy_with(tmp_path: Path, cifar_subset_dir: Path, broken: str, content: bytes) -> Path:
    folder = tmp_path / CIFAR_FOLDER
    folder.mkdir()
    for name in CIFAR_FILES:
        target = folder / name
        if name == broken:
            target.write_bytes(content)
        else:
            target.symlink_to(cifar_subset_dir / CIFAR_FOLDER / name)
    return tmp_path


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (dict, ())  # a harmless call, yet a pickle that calls anything must be refused


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a pickle at all", "data_batch_1 is not a valid CIFAR pickle"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}), r"data_batch_1 holds data of shape \(2, 10\)"),
        (pickle.dumps(_RunsCode()), "data_batch_1 .*unexpected object builtins.dict"),
    ],
    ids=["garbage", "wrong-shape", "foreign-global"],
)
def test_corrupt_cifar_batch(tmp_path: Path, cifar_subset_dir: Path, content: bytes, match: str) -> None:
    root = _cifar_copy_with(tmp_path, cifar_subset_dir, "data_batch_1", content)
    with pytest.raises(DataError, match=match):
        load_split("cifar10", "train", root, download=False)
    assert len(load_split("cifar10", "test", root, download=False)) == 1017  # the intact split still loads


def test_unknown_name_or_split() -> None:
    with pytest.raises(ConfigError, match="cifar10, cifar100, fashion-mnist"):
        load_split("mnist", "train")
    with pytest.raises(ConfigError, match="train, test"):
        load_split("synthetic", "val")


# --------------------------------------------------------------------------- Fashion-MNIST IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_idx_gz_and_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([0, 9, 3, 3, 1])
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images[:2]))  # plain files in data_dir itself
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:2]))
    train = load_split("fashion-mnist", "train", tmp_path, download=False)
    test = load_split("fashion-mnist", "test", tmp_path, download=False)
    assert train.images.shape == (5, 1, 28, 28) and test.images.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), images)
    assert train.labels.tolist() == labels.tolist() and test.labels.tolist() == [0, 9]
    assert train.info.class_names[9] == "Ankle boot"
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(images[:2]))  # 3-D where labels are 1-D
    with pytest.raises(DataError, match="magic number"):
        load_split("fashion-mnist", "test", tmp_path, download=False)


def test_fashion_mnist_missing_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setattr(ds, "_open_url", _no_network)
    with pytest.raises(DataError, match=r"fashion-mnist\.s3.*failed.*data_dir=DIR"):
        load_split("fashion-mnist", "test", tmp_path)


# --------------------------------------------------------------------------- image folders


COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def _write_images(folder: Path, count: int) -> None:
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            size = (40, 30) if i % 2 else (20, 50)  # landscape and portrait
            Image.new("RGB", size, colour).save(folder / name / f"{i}.png")
        (folder / name / "notes.txt").write_text("not an image")


def test_imagefolder_split_by_seed(tmp_path: Path) -> None:
    _write_images(tmp_path, 10)
    train = load_split("imagefolder", "train", tmp_path, image_size=16)
    test = load_split("imagefolder", "test", tmp_path, image_size=16)
    assert train.info.class_names == ("cat", "dog") and train.info.num_classes == 2
    assert train.images.shape == (18, 3, 16, 16) and test.images.shape == (2, 3, 16, 16)
    assert sorted(test.labels.tolist()) == [0, 1]  # 10% of each class
    red = train.images[:, 0].float().mean((1, 2))  # (N,) red channel
    assert (red[train.labels == 0] == 255).all() and (red[train.labels == 1] == 0).all()
    default = load_split("imagefolder", "train", tmp_path)
    assert default.images.shape[-1] == ds.IMAGEFOLDER_DEFAULT_SIZE


def test_imagefolder_train_test_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", 3)
    _write_images(tmp_path / "test", 2)
    assert len(load_split("imagefolder", "train", tmp_path, image_size=8)) == 6
    assert len(load_split("imagefolder", "test", tmp_path, image_size=8)) == 4


def test_imagefolder_empty_or_missing(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_split("imagefolder", "train", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_split("imagefolder", "train", tmp_path / "nowhere")
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_split("imagefolder", "train", tmp_path)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seeded() -> None:
    a = load_split("synthetic", "train", synthetic_size=100, seed=1)
    b = load_split("synthetic", "train", synthetic_size=100, seed=1)
    assert a.images.shape == (100, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, load_split("synthetic", "train", synthetic_size=100, seed=2).images)
    assert not torch.equal(a.images, load_split("synthetic", "test", synthetic_size=100, seed=1).images)
    assert torch.bincount(a.labels).tolist() == [10] * 10
    assert load_split("synthetic", "test", synthetic_size=8, image_size=48).images.shape == (8, 3, 48, 48)


def test_synthetic_classes_are_separable() -> None:
    """Class means differ far more than the images of one class: there is something to learn."""
    data = load_split("synthetic", "train", synthetic_size=400)
    x = data.images.float().flatten(1) / 255  # (N, D)
    centroids = torch.stack([x[data.labels == c].mean(0) for c in range(10)])  # (10, D)
    nearest = torch.cdist(x, centroids).argmin(1)
    assert (nearest == data.labels).float().mean() > 0.9
