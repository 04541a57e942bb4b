"""A synthetic image dataset drawn from a seed: learnable by SSL, needs no files (tests, smoke runs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedssl.data.images import SPLITS, DatasetInfo, ImageData
from fedssl.errors import ConfigError

# mean/std measured on 20,000 synthetic images.
SYNTHETIC_INFO = DatasetInfo("synthetic", 3, 32, 10, (0.3182, 0.3485, 0.3237), (0.2612, 0.2773, 0.2656))


def make_synthetic(split: str, n: int, size: int, seed: int) -> ImageData:
    """``n`` images of 10 classes: class-oriented coloured stripes plus a blob, random offsets and noise.

    Class ``c`` fixes the stripe angle (c * 18 degrees) and colour; each image draws its own
    phase, frequency jitter, blob position and noise, so views of one image share structure
    that SSL can learn while the class stays recoverable. Train and test use different sub-seeds.
    """
    if n < 1:
        raise ConfigError(f"synthetic_size must be >= 1 (got {n}): pass e.g. synthetic_size=512")
    num_classes = SYNTHETIC_INFO.num_classes
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
    info = dataclasses.replace(SYNTHETIC_INFO, image_size=size)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), info)
