"""What every loader returns: :class:`DatasetInfo`, :class:`ImageData` (a split held in memory) and resizing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
_RESIZE_CHUNK = 512  # images resized per interpolate call, bounds the float intermediate


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its name, shape, classes and normalisation statistics.

    In :data:`fedssl.data.datasets.DATASETS` ``image_size`` is the native side; in a loaded
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
