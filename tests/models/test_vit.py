"""ViT as a list of layers: split/compose identity, tokens, patchify, counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedssl.errors import ConfigError
from fedssl.models.backbones import build_encoder
from fedssl.models.vit import (
    VIT_PRESETS, VisionTransformer, patchify, sincos_pos_embed_2d, unpatchify, vit_block_flops,
    vit_flops_per_image, vit_param_count,
)
from fedssl.resources import flop_counter


def small_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{"image_size": 16, "patch_size": 4, "width": 32, "depth": 3, "heads": 2, **kwargs})


@pytest.mark.parametrize("train", [False, True])
def test_forward_to_then_from_equals_forward(train: bool) -> None:
    model = small_vit().train(train)
    x = torch.randn(2, 3, 16, 16)
    full = model(x)
    for k in range(model.num_layers() + 1):
        torch.testing.assert_close(model.forward_from(model.forward_to(x, k), k), full)
    assert full.shape == (2, 32)


def test_tokens_shape_and_layout() -> None:
    model = small_vit(in_channels=1)
    x = torch.randn(5, 1, 16, 16)
    assert model.num_layers() == 4
    assert model.layer_dims() == [32] * 4
    for k in range(1, 5):
        assert model.forward_to(x, k).shape == (5, 16, 32)  # (N, L, width), L = (16/4)**2
    block = model.layers[1]
    assert block.norm_first and block.self_attn.batch_first


def test_pool_is_layernorm_then_token_mean() -> None:
    model = small_vit()
    h = torch.randn(2, 16, 32)
    expected = torch.nn.functional.layer_norm(h, (32,), eps=1e-6).mean(dim=1)
    torch.testing.assert_close(model.pool(h), expected)


def test_patchify_layout_and_round_trip() -> None:
    imgs = torch.randn(2, 3, 8, 12)
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 48)  # (N, L, p*p*C)
    # patch (row 1, col 2) holds pixels [4:8, 8:12], flattened as (p, p, C)
    torch.testing.assert_close(x[:, 1 * 3 + 2], imgs[:, :, 4:8, 8:12].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(unpatchify(x, 4, 3, grid=(2, 3)), imgs)
    square = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(unpatchify(patchify(square, 2), 2, 1), square)
    with pytest.raises(ConfigError, match="square"):
        unpatchify(x, 4, 3)


def test_patch_embed_matches_patchify_projection() -> None:
    """The conv patchify is a linear map of patchify()'s rows (so MAE targets and tokens agree on patches)."""
    model = small_vit(pos_embed="learned")
    embed = model.patch_embed
    imgs = torch.randn(2, 3, 16, 16)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(32, -1)  # (width, p*p*C) in (p, p, C) order
    expected = patchify(imgs, 4) @ weight.T + embed.proj.bias + embed.pos_embed
    torch.testing.assert_close(embed(imgs), expected, atol=1e-5, rtol=1e-4)


def test_sincos_positions_are_distinct_fixed_and_not_saved() -> None:
    table = sincos_pos_embed_2d(16, (4, 4))
    assert table.shape == (16, 16)
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1  # every position distinct
    model = small_vit()
    assert not any("pos_embed" in name for name in model.state_dict())
    assert any("pos_embed" in name for name in small_vit(pos_embed="learned").state_dict())


@pytest.mark.parametrize("kwargs", [
    {},
    {"pos_embed": "learned"},
    {"in_channels": 1, "mlp_ratio": 2.0, "depth": 1},
    {"image_size": 32, "patch_size": 8, "width": 48, "heads": 3, "depth": 0},
])
def test_param_count_formula(kwargs: dict) -> None:
    model = small_vit(**kwargs)
    args = {"image_size": 16, "patch_size": 4, "width": 32, "depth": 3, **kwargs}
    args.pop("heads", None)
    assert vit_param_count(**args) == sum(p.numel() for p in model.parameters())


def test_tiny_preset_param_count() -> None:
    model = build_encoder("vit", in_channels=3, image_size=32, preset="tiny", patch_size=4)
    assert VIT_PRESETS["tiny"] == {"width": 192, "depth": 12, "heads": 3}
    assert sum(p.numel() for p in model.parameters()) == vit_param_count(
        width=192, depth=12, patch_size=4, image_size=32) == 5_348_160


def test_flops_formula_matches_flop_counter() -> None:
    """The ledger's counter (with PyTorch's fused CPU attention taught to it) equals the analytic formula,
    on the training path and on the fused no-grad inference path frozen blocks take."""
    model = small_vit(depth=2)
    expected = vit_flops_per_image(width=32, depth=2, patch_size=4, image_size=16)
    for training in (True, False):
        model.train(training)
        with torch.no_grad(), flop_counter() as counter:
            model(torch.randn(3, 3, 16, 16))
        assert counter.get_total_flops() / 3 == expected
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    assert plain.get_total_flops() < expected  # what the plain counter would have missed


def test_flops_with_visible_tokens_only() -> None:
    """An MAE encoder embeds all 196 patches but runs its blocks on the 49 visible ones."""
    full = vit_flops_per_image(width=192, depth=1, patch_size=16, image_size=224)
    visible = vit_flops_per_image(width=192, depth=1, patch_size=16, image_size=224, num_tokens=49)
    patch_embed = vit_flops_per_image(width=192, depth=0, patch_size=16, image_size=224)
    assert patch_embed == 2 * 196 * (3 * 16 * 16) * 192
    assert full - patch_embed == vit_block_flops(192, 196)
    assert visible - patch_embed == vit_block_flops(192, 49)
    assert vit_block_flops(192, 49) < vit_block_flops(192, 196) / 4  # linear parts /4, attention /16


def test_large_images_one_block() -> None:
    model = build_encoder("vit", in_channels=3, image_size=224, patch_size=16, width=192, depth=1, heads=3)
    x = torch.randn(2, 3, 224, 224)
    tokens = model.forward_to(x, 1)
    assert tokens.shape == (2, 196, 192)
    out = model(x)
    assert out.shape == (2, 192) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.layers[1].linear1.weight.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        small_vit(image_size=18)
    with pytest.raises(ConfigError, match="heads"):
        small_vit(heads=3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        small_vit(width=6, heads=2)
    with pytest.raises(ConfigError, match="pos_embed"):
        small_vit(pos_embed="rope")
    with pytest.raises(ConfigError, match="patch_size"):
        build_encoder("vit", in_channels=3, image_size=32, preset="tiny")
    with pytest.raises(ConfigError, match="preset"):
        build_encoder("vit", in_channels=3, image_size=32, preset="huge", patch_size=4)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_staged_vit_exports_with_its_in_process_features(tmp_path, suffix: str) -> None:
    """A staged run ends with frozen blocks and a trainable last block (each picks another kernel in grad mode)."""
    from fedssl.export import export_encoder
    from fedssl.models.staged import set_trainable

    model = small_vit().train()
    set_trainable(model.layers[:-1], False)
    path = tmp_path / f"encoder{suffix}"
    export_encoder(model, mean=[0.5] * 3, std=[0.25] * 3, channels=3, image_size=16, path=path)
    loaded = torch.export.load(path).module() if suffix == ".pt2" else torch.jit.load(path)
    images = torch.rand(3, 3, 16, 16)  # (N, C, H, W) in [0, 1]
    with torch.no_grad():
        expected = model.eval()((images - 0.5) / 0.25)
    torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-5)
