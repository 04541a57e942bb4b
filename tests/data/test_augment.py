"""Batched augmentations: shapes, randomness from the torch RNG, normalisation, 1-channel input."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from fedssl.data.augment import (
    PRESETS,
    EvalTransform,
    MaskedViewAugment,
    Normalize,
    TwoViewAugment,
    blur_kernel_size,
    to_float,
)
from fedssl.errors import ConfigError


def _images(n: int = 16, channels: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    smooth = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return (torch.nn.functional.interpolate(smooth, size=size, mode="bilinear") * 255).to(torch.uint8)  # (N, C, S, S)


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = to_float(images)
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    assert to_float(f) is f
    out = Normalize((0.0, 0.2, 0.5), (1.0, 0.5, 0.25))(f)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(TypeError):
        to_float(x.long())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_views_shapes_and_differ(preset: str) -> None:
    images = _images()
    first, second = TwoViewAugment(24, *_stats(images), preset=preset)(images)
    assert first.shape == second.shape == (16, 3, 24, 24)
    assert first.dtype == second.dtype == torch.float32
    assert (first - second).abs().mean() > 0.1


def test_same_seed_same_views_and_float_input_equivalent() -> None:
    images = _images()
    augment = TwoViewAugment(32, *_stats(images))
    torch.manual_seed(5)
    a = augment(images)
    torch.manual_seed(5)
    b = augment(images)
    torch.manual_seed(5)
    c = augment(to_float(images))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.allclose(x, y) for x, y in zip(a, c))
    torch.manual_seed(6)
    assert not torch.equal(augment(images)[0], a[0])


def test_views_roughly_centred() -> None:
    images = _images(64)
    mean, std = _stats(images)
    for view in TwoViewAugment(32, mean, std)(images):
        assert view.mean().abs() < 0.5 and 0.4 < view.std() < 2.0
    evaluated = EvalTransform(32, mean, std)(images)
    assert evaluated.mean((0, 2, 3)).abs().max() < 1e-4 and (evaluated.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_one_channel_input() -> None:
    images = _images(channels=1, size=28)
    first, second = TwoViewAugment(28, (0.286,), (0.353,), channels=1)(images)
    assert first.shape == second.shape == (16, 1, 28, 28)
    assert MaskedViewAugment(28, (0.286,), (0.353,), channels=1)(images)[0].shape == (16, 1, 28, 28)
    with pytest.raises(ConfigError, match="channels"):
        TwoViewAugment(28, (0.286,), (0.353,), channels=3)


def test_byol_views_are_asymmetric() -> None:
    augment = TwoViewAugment(32, (0.5,) * 3, (0.25,) * 3, preset="byol")
    kinds = [[type(op) for op in view] for view in augment.views]
    assert K.RandomSolarize not in kinds[0] and K.RandomSolarize in kinds[1]
    blur_p = [next(op.p for op in view if isinstance(op, K.RandomGaussianBlur)) for view in augment.views]
    assert blur_p == [1.0, 0.1]


def test_masked_view_and_eval_resize() -> None:
    images = _images()
    mean, std = _stats(images)
    assert MaskedViewAugment(48, mean, std)(images)[0].shape == (16, 3, 48, 48)
    same = EvalTransform(32, mean, std)(images)
    assert torch.allclose(same, Normalize(mean, std)(to_float(images)))  # no resize when not needed
    assert EvalTransform(64, mean, std)(images).shape == (16, 3, 64, 64)


def test_blur_kernel_and_bad_preset() -> None:
    assert [blur_kernel_size(s) for s in (28, 32, 64, 224)] == [3, 3, 7, 23]
    with pytest.raises(ConfigError, match="mocov2"):
        TwoViewAugment(32, (0.5,) * 3, (0.25,) * 3, preset="dino")
