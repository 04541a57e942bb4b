"""A client's own data folder (``fedssl deploy partition`` writes it, a SuperNode reads it): what it holds and
which runs it serves.

A folder ``partition-<i>/`` holds ``images.npy`` (the client's images, uint8 (N, C, H, W)) and
``partition.json`` (which partition of how many, the partitioning key, a digest of the images, the
dataset's statistics). It serves only runs whose config partitions the data the same way
(:func:`partition_key`); clients hold no labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fedssl.config import RunConfig
from fedssl.data.datasets import DatasetInfo, ImageData
from fedssl.errors import DataError
from fedssl.methods import METHODS

PARTITION_FILE = "partition.json"
IMAGES_FILE = "images.npy"


def partition_key(cfg: RunConfig) -> str:
    """What decides which images a client holds: a partition written for one key serves only runs with it."""
    keep = {"dataset": cfg.dataset, "image_size": cfg.image_size, "seed": cfg.seed, "clients": cfg.clients,
            "partition": cfg.partition, "alpha": cfg.alpha, "classes_per_client": cfg.classes_per_client,
            "shards_per_client": cfg.shards_per_client, "held_out": METHODS[cfg.method].aux_fraction(cfg)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def digest(images: torch.Tensor) -> str:
    """A short fingerprint of a client's images (which partition a node really read)."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def check_partition_dir(data_dir: str | Path, partition_id: int, num_partitions: int) -> dict:
    """The node's data dir must hold its own partition (``export_partitions``): its metadata, or a clear error."""
    folder = Path(data_dir).expanduser()
    if not (folder / PARTITION_FILE).is_file() or not (folder / IMAGES_FILE).is_file():
        raise DataError(f"{folder} holds no client partition ({PARTITION_FILE} + {IMAGES_FILE}); write them with "
                        f"fedssl deploy partition --out DIR and pass --data-dir DIR/partition-{partition_id}")
    meta = json.loads((folder / PARTITION_FILE).read_text())
    if (int(meta["partition-id"]), int(meta["num-partitions"])) != (partition_id, num_partitions):
        raise DataError(f"{folder} holds partition {meta['partition-id']} of {meta['num-partitions']}, not "
                        f"{partition_id} of {num_partitions}; pass this node its own folder")
    return meta


@functools.lru_cache(maxsize=2)
def read_partition(data_dir: str, partition_id: int, num_partitions: int, key: str) -> ImageData:
    meta = check_partition_dir(data_dir, partition_id, num_partitions)
    if meta["key"] != key:
        raise DataError(f"data dir {data_dir} was written for another partitioning (dataset, clients, partition or "
                        "seed differ); re-export it with fedssl deploy partition and this run's config")
    images = torch.from_numpy(np.load(Path(data_dir).expanduser() / IMAGES_FILE, allow_pickle=False))  # (N, C, H, W)
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["info"].items()})
    labels = torch.full((images.shape[0],), -1, dtype=torch.int64)  # clients hold no labels
    return ImageData(images, labels, info)
