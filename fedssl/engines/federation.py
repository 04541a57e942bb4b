"""The data as a run sees it: the pooled splits and the clients' index sets, and the device the run uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedssl.config import DEVICE_PATTERN, RunConfig
from fedssl.data.datasets import ImageData, load_split
from fedssl.data.partition import class_histogram, hold_out, partition
from fedssl.errors import FedSSLError
from fedssl.methods import METHODS


@dataclass
class Federation:
    """The data as the run sees it: pooled train/test splits and the clients' index sets."""

    train: ImageData  # the training split less the validation split: the clients' pool and the kNN / probe bank
    test: ImageData
    client_indices: list[np.ndarray]
    server_indices: np.ndarray | None = None  # the server's auxiliary share (Method.aux_fraction), never a client's
    val: ImageData | None = None  # eval.val_fraction of the training split, held out before partitioning

    @property
    def monitor(self) -> ImageData:
        """What the kNN monitor scores: the validation split where there is one, else the test split."""
        return self.test if self.val is None else self.val

    def client_data(self, client_id: int) -> ImageData:
        return self.train.subset(self.client_indices[client_id])

    def server_data(self) -> ImageData | None:
        return None if self.server_indices is None else self.train.subset(self.server_indices)

    def histogram(self) -> np.ndarray:  # (clients, classes)
        return class_histogram(self.train.labels.numpy(), self.client_indices, self.train.info.num_classes)


def load_federation(cfg: RunConfig, pooled: bool) -> Federation:
    """Load both splits and partition the training split over the clients (one part if pooled)."""
    kwargs = dict(data_dir=cfg.data_dir or None, image_size=cfg.image_size or None, download=cfg.download,
                  seed=cfg.seed)
    train = load_split(cfg.dataset, "train", **kwargs)
    test = load_split(cfg.dataset, "test", **kwargs)
    val = None
    if cfg.eval.val_fraction > 0:
        val_ix, rest = hold_out(len(train), cfg.eval.val_fraction, cfg.seed, salt=0x7A1)
        train, val = train.subset(rest), train.subset(val_ix)
    server, pool = None, np.arange(len(train), dtype=np.int64)
    fraction = METHODS[cfg.method].aux_fraction(cfg)
    if fraction > 0 and not pooled:
        server, pool = hold_out(len(train), fraction, cfg.seed)  # removed BEFORE partitioning
    if pooled:
        parts = [pool]
    else:
        parts = [pool[p] for p in partition(train.labels.numpy()[pool], cfg.clients, cfg.partition, alpha=cfg.alpha,
                                            classes_per_client=cfg.classes_per_client,
                                            shards_per_client=cfg.shards_per_client, seed=cfg.seed)]
    return Federation(train, test, parts, server, val)


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device``: ``cpu``, ``cuda`` (= the current CUDA device) or ``cuda:N``.

    A device this machine does not have is one clear error naming the fix, before anything is built on it.
    """
    match = DEVICE_PATTERN.fullmatch(name)
    if match is None:
        raise FedSSLError(f"device {name!r} is not cpu, cuda or cuda:N; use e.g. --set device=cuda")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FedSSLError(f"device {name} was asked for but CUDA is not available here "
                          f"(torch {torch.__version__}); use --set device=cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise FedSSLError(f"device {name} was asked for but this machine has {count} CUDA device(s); "
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device(name)


