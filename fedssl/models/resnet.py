"""ResNet (BasicBlock) as a flat list of layers: ``[stem, block1, ..., blockB]`` + global average pool.

CIFAR stem (3x3 conv, stride 1, no max-pool) by default; ``stem="imagenet"``
(7x7 stride-2 conv + 3x3 stride-2 max-pool) for large images.
``norm="group"`` (default) is GroupNorm after weight-standardised convolutions:
it works at batch size 1 and keeps no running statistics, which split learning
with tiny per-client batches needs. ``norm="batch"`` is the classic BatchNorm.

ResNet-18 (``blocks_per_stage=(2, 2, 2, 2)``, ``width=64``, CIFAR stem, 3
input channels) has 9 layers and 11,168,832 parameters (see ``resnet_param_count``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedssl.errors import ConfigError
from fedssl.models.encoder import Encoder, preset_kwargs

NORMS = ("group", "batch")
STEMS = ("cifar", "imagenet")
RESNET_PRESETS: dict[str, dict[str, Any]] = {
    "resnet18": dict(blocks_per_stage=(2, 2, 2, 2)),
    "resnet10": dict(blocks_per_stage=(1, 1, 1, 1)),
}


class WSConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel (mean 0, std 1) at every forward.

    Paired with GroupNorm it trains like BatchNorm without depending on the batch.
    """

    def __init__(self, *args: Any, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight actually used: (C_out, C_in/groups, kH, kW), each output channel standardised."""
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def group_norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 2, group_channels: int = 0) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` and leaves >= ``min_group_size`` channels per group.

    64..512 channels -> 32 groups (the usual GN setting); 16 -> 8; 32 -> 16; odd sizes fall back to fewer groups.
    ``group_channels`` > 0: about that many channels per group instead (the largest divisor of ``channels``
    that leaves at least ``group_channels`` in each group; 1 group where ``channels`` is smaller).
    """
    if group_channels > 0:
        return max((g for g in range(1, channels + 1) if channels % g == 0 and channels // g >= group_channels),
                   default=1)
    candidates = [g for g in range(1, min(max_groups, channels) + 1)
                  if channels % g == 0 and channels // g >= min_group_size]
    return max(candidates, default=1)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}: choose one of {list(NORMS)}.")


def make_norm2d(norm: str, channels: int, group_channels: int = 0) -> nn.Module:
    """GroupNorm (``"group"``, groups from ``group_norm_groups``) or BatchNorm2d (``"batch"``) over ``channels``."""
    _check_norm(norm)
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(channels, group_channels=group_channels), channels)
    return nn.BatchNorm2d(channels)


def make_conv2d(norm: str, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free 'same' conv; weight-standardised when it feeds a GroupNorm."""
    _check_norm(norm)
    conv_cls = WSConv2d if norm == "group" else nn.Conv2d
    return conv_cls(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class Stem(nn.Sequential):
    """conv -> norm -> ReLU (-> max-pool for the ImageNet stem): (N, C_in, H, W) -> (N, width, H/s, W/s)."""

    def __init__(self, in_channels: int, width: int, stem: str = "cifar", norm: str = "group",
                 group_channels: int = 0) -> None:
        if stem not in STEMS:
            raise ConfigError(f"unknown stem {stem!r}: choose one of {list(STEMS)}.")
        if stem == "cifar":  # s = 1
            super().__init__(make_conv2d(norm, in_channels, width, 3), make_norm2d(norm, width, group_channels),
                             nn.ReLU(inplace=True))
        else:  # s = 4
            super().__init__(make_conv2d(norm, in_channels, width, 7, stride=2), make_norm2d(norm, width, group_channels),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: (N, C_in, H, W) -> (N, C_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "group", group_channels: int = 0) -> None:
        super().__init__()
        self.conv1 = make_conv2d(norm, c_in, c_out, 3, stride)
        self.norm1 = make_norm2d(norm, c_out, group_channels)
        self.conv2 = make_conv2d(norm, c_out, c_out, 3)
        self.norm2 = make_norm2d(norm, c_out, group_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(make_conv2d(norm, c_in, c_out, 1, stride),
                                          make_norm2d(norm, c_out, group_channels))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))  # (N, C_out, H', W')
        h = self.norm2(self.conv2(h))  # (N, C_out, H', W')
        return F.relu(h + self.shortcut(x))


@dataclass(frozen=True)
class BlockSpec:
    """One BasicBlock: input / output channels and stride."""

    c_in: int
    c_out: int
    stride: int


def block_specs(width: int, blocks_per_stage: Sequence[int]) -> list[BlockSpec]:
    """Stage ``i`` has width ``width * 2**i``; its first block has stride 2 (except stage 0)."""
    specs: list[BlockSpec] = []
    c_in = width
    for stage, n_blocks in enumerate(blocks_per_stage):
        c_out = width * 2**stage
        for b in range(n_blocks):
            specs.append(BlockSpec(c_in, c_out, 2 if (stage > 0 and b == 0) else 1))
            c_in = c_out
    return specs


def _check_resnet_args(in_channels: int, width: int, blocks_per_stage: Sequence[int]) -> None:
    if in_channels < 1:
        raise ConfigError(f"in_channels={in_channels} must be positive: pass 3 for RGB or 1 for grey images.")
    if width < 1:
        raise ConfigError(f"width={width} must be positive: pass e.g. 64 (standard), 32 or 16 (narrow).")
    if len(blocks_per_stage) == 0 or any(int(n) < 1 for n in blocks_per_stage):
        raise ConfigError(f"blocks_per_stage={tuple(blocks_per_stage)} needs >= 1 block per stage: "
                          "pass e.g. (2, 2, 2, 2) for ResNet-18.")


class ResNet(Encoder):
    """ResNet with BasicBlocks as ``layers = [stem, block1, ..., blockB]``; pool = global average -> (N, 8*width)."""

    def __init__(self, *, in_channels: int = 3, width: int = 64,
                 blocks_per_stage: Sequence[int] = (2, 2, 2, 2), stem: str = "cifar",
                 norm: str = "group", group_channels: int = 0) -> None:
        _check_resnet_args(in_channels, width, blocks_per_stage)
        _check_norm(norm)
        specs = block_specs(width, blocks_per_stage)
        layers: list[nn.Module] = [Stem(in_channels, width, stem, norm, group_channels)]
        layers += [BasicBlock(s.c_in, s.c_out, s.stride, norm, group_channels) for s in specs]
        dims = [width] + [s.c_out for s in specs]
        super().__init__(layers, dims, feature_dim=dims[-1])
        self.norm_kind = norm
        self.blocks_per_stage = tuple(int(n) for n in blocks_per_stage)
        # stage_ends[i] = k such that forward_to(x, k) is the output of stage i (LW-FedSSL's ResNet stages).
        self.stage_ends: list[int] = list(accumulate(self.blocks_per_stage, initial=1))[1:]
        self._init_weights()
        # channels_last: oneDNN's fast path on CPU (about 10x faster for narrow GroupNorm nets here)
        self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def pool(self, h: Tensor) -> Tensor:
        """Global average pool: (N, C, H, W) -> (N, C)."""
        return h.mean(dim=(2, 3))


def resnet_param_count(*, in_channels: int = 3, width: int = 64,
                       blocks_per_stage: Sequence[int] = (2, 2, 2, 2), stem: str = "cifar") -> int:
    """Analytic parameter count; the same for both norms (GroupNorm and BatchNorm each have 2C parameters)."""
    kernel = 3 if stem == "cifar" else 7
    total = in_channels * width * kernel**2 + 2 * width  # stem conv + norm
    for s in block_specs(width, blocks_per_stage):
        total += s.c_in * s.c_out * 9 + 2 * s.c_out  # conv1 + norm1
        total += s.c_out * s.c_out * 9 + 2 * s.c_out  # conv2 + norm2
        if s.stride != 1 or s.c_in != s.c_out:
            total += s.c_in * s.c_out + 2 * s.c_out  # 1x1 projection shortcut + norm
    return total


def build_resnet(*, in_channels: int, image_size: int, preset: str | None = None, **kwargs: Any) -> ResNet:
    """``ARCHS["resnet"]``: a ResNet from a preset in ``RESNET_PRESETS`` plus overrides.

    ``image_size`` is accepted for the common builder signature; the network is size-agnostic.
    """
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be positive: pass the side of the (square) input images.")
    config = preset_kwargs("resnet", RESNET_PRESETS, preset, kwargs)
    try:
        return ResNet(in_channels=in_channels, **config)
    except TypeError as err:
        raise ConfigError(f"bad resnet argument ({err}): "
                          "use in_channels, width, blocks_per_stage, stem, norm.") from None


__all__ = [
    "BasicBlock", "BlockSpec", "RESNET_PRESETS", "ResNet", "Stem", "WSConv2d", "block_specs", "build_resnet",
    "group_norm_groups", "make_conv2d", "make_norm2d", "resnet_param_count",
]
