"""Batched image augmentation on tensors (kornia): SSL views, MAE views, evaluation transform.

Every module takes a whole batch (N, C, H, W), uint8 or float in [0, 1], and
returns normalised float32 images; one kornia call per operation per view.
Randomness comes from the global torch RNG, so ``torch.manual_seed`` makes the
views reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from fedssl.errors import ConfigError


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 in [0, 1]; float input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")


class Normalize(nn.Module):
    """(x - mean) / std per channel, for float images in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"normalisation needs one positive std per mean (got mean {tuple(mean)}, std {tuple(std)}): fix the dataset statistics")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) float -> same
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class AugmentPreset:
    """One SSL augmentation recipe; ``(view 1, view 2)`` pairs allow asymmetric views (BYOL)."""

    crop_scale: tuple[float, float]
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_p: float
    gray_p: float
    blur_p: tuple[float, float]
    solarize_p: tuple[float, float]


PRESETS: dict[str, AugmentPreset] = {
    # MoCo v2 (Chen et al. 2020), also MocoSFL's reference code.
    "mocov2": AugmentPreset((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, (0.5, 0.5), (0.0, 0.0)),
    # SimCLR (Chen et al. 2020), colour strength 1.0.
    "simclr": AugmentPreset((0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, (0.5, 0.5), (0.0, 0.0)),
    # BYOL (Grill et al. 2020): blur always on view 1, rarely on view 2; solarize view 2 only.
    "byol": AugmentPreset((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, (1.0, 0.1), (0.0, 0.2)),
}


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (3 for 32 px, 23 for 224 px)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _crop_flip(image_size: int, scale: tuple[float, float]) -> list[nn.Module]:
    return [K.RandomResizedCrop((image_size, image_size), scale=scale), K.RandomHorizontalFlip()]


def _ssl_view(image_size: int, preset: AugmentPreset, view: int, channels: int, blur: bool = True) -> nn.Sequential:
    """Crop, flip, colour (RGB only), blur (unless ``blur`` is False) and solarize ops of one view; normalisation
    is separate."""
    ops = _crop_flip(image_size, preset.crop_scale)
    if channels == 3:  # colour jitter and grayscale mean nothing for 1-channel images
        ops.append(K.ColorJitter(*preset.jitter, p=preset.jitter_p))
        ops.append(K.RandomGrayscale(p=preset.gray_p))
    if blur and preset.blur_p[view] > 0:
        k = blur_kernel_size(image_size)
        ops.append(K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=preset.blur_p[view]))
    if preset.solarize_p[view] > 0:  # threshold exactly 0.5, as in BYOL
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=preset.solarize_p[view]))
    return nn.Sequential(*ops)


def _check_channels(mean: Sequence[float], channels: int) -> None:
    if channels not in (1, 3) or len(mean) != channels:
        raise ConfigError(f"augmentation needs 1 or 3 channels with one mean per channel (got {channels} channels, {len(mean)} means): use the dataset's DatasetInfo")


class TwoViewAugment(nn.Module):
    """Two independently augmented, normalised views of a batch (MoCo, SimCLR, BYOL)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], preset: str = "mocov2",
                 channels: int = 3, blur: bool = True) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"unknown augmentation preset {preset!r}: use one of {', '.join(PRESETS)}")
        _check_channels(mean, channels)
        self.views = nn.ModuleList(_ssl_view(image_size, PRESETS[preset], v, channels, blur) for v in range(2))
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) uint8 or float [0, 1] -> two (N, C, S, S) normalised float views."""
        x = to_float(images)
        first, second = (self.normalize(view(x)) for view in self.views)
        return first, second


class MaskedViewAugment(nn.Module):
    """MAE's single view: RandomResizedCrop (scale 0.2-1.0) + horizontal flip, normalised."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> None:
        super().__init__()
        _check_channels(mean, channels)
        self.view = nn.Sequential(*_crop_flip(image_size, (0.2, 1.0)))
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """(N, C, H, W) uint8 or float [0, 1] -> a 1-tuple of (N, C, S, S) normalised float (one view, like
        ``TwoViewAugment``'s pair: a training step calls ``model.loss(*views)``)."""
        return (self.normalize(self.view(to_float(images))),)


class EvalTransform(nn.Module):
    """Deterministic evaluation transform: to float, resize to (S, S) only if needed, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.image_size = image_size
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 or float [0, 1] -> (N, C, S, S) normalised float."""
        x = to_float(images)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(x)
