"""ResNet as a list of cut points: layout, split/compose identity, GroupNorm at batch size 1, counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssl.errors import ConfigError
from fedssl.models.backbones import ARCHS, build_encoder
from fedssl.models.resnet import ResNet, WSConv2d, group_norm_groups, resnet_param_count


def small_resnet(**kwargs) -> ResNet:
    return ResNet(**{"width": 8, "blocks_per_stage": (1, 1, 1, 1), **kwargs})


def test_resnet18_layout() -> None:
    model = ResNet()
    assert model.num_layers() == 9
    assert model.layer_dims() == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    assert model.feature_dim == 512
    assert model.stage_ends == [3, 5, 7, 9]
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == 20  # 1 stem + 16 block convs + 3 shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_forward_to_then_from_equals_forward(norm: str) -> None:
    model = ResNet(width=8, blocks_per_stage=(2, 2, 2, 2), norm=norm).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        for k in range(model.num_layers() + 1):
            h = model.forward_to(x, k)
            if k > 0:
                assert h.shape[1] == model.layer_dims()[k - 1]
            torch.testing.assert_close(model.forward_from(h, k), full)
    assert full.shape == (3, 64)
    assert torch.equal(model.forward_to(x, 0), x)


def test_spatial_sizes_cifar_and_imagenet_stems() -> None:
    x = torch.randn(1, 3, 64, 64)
    cifar, imagenet = small_resnet(), small_resnet(stem="imagenet")
    assert cifar.forward_to(x, 1).shape == (1, 8, 64, 64)
    assert imagenet.forward_to(x, 1).shape == (1, 8, 16, 16)
    assert cifar.forward_to(x, cifar.num_layers()).shape == (1, 64, 8, 8)
    assert imagenet(x).shape == (1, 64)


def test_group_norm_works_at_batch_one_and_is_batch_independent() -> None:
    model = small_resnet(in_channels=1).train()  # train mode: a BatchNorm would mix samples here
    x = torch.randn(4, 1, 16, 16)
    batched = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-4)
    assert not list(model.buffers())  # no running statistics to average or send


def test_batch_norm_is_batch_dependent_in_training() -> None:
    """The contrast that makes the test above meaningful."""
    model = small_resnet(norm="batch").train()
    x = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(model(x)[:1], model(torch.cat([x[:1], x[:1] * 3]))[:1], atol=1e-3)


@pytest.mark.parametrize("kwargs", [
    {},
    {"width": 16},
    {"width": 32, "blocks_per_stage": (1, 1, 1, 1), "in_channels": 1},
    {"width": 8, "stem": "imagenet", "norm": "batch"},
    {"width": 8, "blocks_per_stage": (3, 1)},
])
def test_param_count_formula(kwargs: dict) -> None:
    model = ResNet(**kwargs)
    formula_kwargs = {k: v for k, v in kwargs.items() if k != "norm"}
    assert resnet_param_count(**formula_kwargs) == sum(p.numel() for p in model.parameters())


def test_resnet18_param_count_value() -> None:
    assert resnet_param_count() == 11_168_832


def test_ws_conv_standardises_each_output_channel() -> None:
    conv = WSConv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1, 7).view(6, 1, 1, 1)).add_(5.0)  # per-channel scale and shift
    w = conv.standardized_weight().view(6, -1)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.std(dim=1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    x = torch.randn(2, 4, 5, 5)
    reference = torch.nn.functional.conv2d(x, w.view_as(conv.weight), padding=1)
    torch.testing.assert_close(conv(x), reference)


def test_ws_conv_output_invariant_to_weight_affine_change() -> None:
    conv = WSConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(-2.0)
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=1e-4)


def test_group_counts_divide_channels() -> None:
    assert group_norm_groups(64) == 32 and group_norm_groups(512) == 32
    assert group_norm_groups(16) == 8 and group_norm_groups(8) == 4
    for c in (1, 3, 6, 24, 48, 96, 100):
        g = group_norm_groups(c)
        assert c % g == 0 and g <= 32


def test_build_encoder_and_bad_arguments() -> None:
    assert "resnet" in ARCHS and "vit" in ARCHS
    model = build_encoder("resnet", in_channels=3, image_size=32, preset="resnet10", width=8)
    assert model.num_layers() == 5 and model.feature_dim == 64
    with pytest.raises(ConfigError, match="arch"):
        build_encoder("vgg", in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="norm"):
        small_resnet(norm="layer")
    with pytest.raises(ConfigError, match="stem"):
        small_resnet(stem="huge")
    with pytest.raises(ConfigError, match="blocks_per_stage"):
        small_resnet(blocks_per_stage=(2, 0))
    with pytest.raises(ConfigError, match="preset"):
        build_encoder("resnet", in_channels=3, image_size=32, preset="resnet50")
    with pytest.raises(ConfigError, match="bad resnet argument"):
        build_encoder("resnet", in_channels=3, image_size=32, depth=18)
    with pytest.raises(ConfigError, match="between 0 and 5"):
        small_resnet().forward_to(torch.randn(1, 3, 8, 8), 6)
