"""The backbone registry: architecture name -> builder of an ``Encoder`` (``fedssl.models.encoder``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedssl.errors import ConfigError
from fedssl.models.encoder import Encoder
from fedssl.models.resnet import build_resnet
from fedssl.models.vit import build_vit

EncoderBuilder = Callable[..., Encoder]

ARCHS: dict[str, EncoderBuilder] = {"resnet": build_resnet, "vit": build_vit}


def build_encoder(arch: str, *, in_channels: int, image_size: int, **kwargs: Any) -> Encoder:
    """Build a registered backbone from ``ARCHS``.

    Example: ``build_encoder("vit", in_channels=3, image_size=32, preset="tiny", patch_size=4)``.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}: choose one of {sorted(ARCHS)}.")
    return ARCHS[arch](in_channels=in_channels, image_size=image_size, **kwargs)


__all__ = ["ARCHS", "EncoderBuilder", "build_encoder"]
