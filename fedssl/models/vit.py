"""Vision Transformer as a flat list of layers: ``[patch_embed, block1, ..., blockD]`` + LayerNorm + mean pool.

No class token: features are the mean of the final-normed tokens, so any
layer's tokens can be pooled the same way (layer-wise training, FedMAE cascades).
Blocks are ``torch.nn.TransformerEncoderLayer`` in pre-norm form (PyTorch's fast path).

ViT-Tiny (width 192, depth 12, 3 heads, mlp_ratio 4) with patch 4 on 3x32x32
images and fixed sin-cos positions has 5,348,160 parameters and about
0.72 GFLOPs per image forward (see ``vit_param_count`` / ``vit_flops_per_image``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fedssl.errors import ConfigError
from fedssl.models.encoder import Encoder, preset_kwargs

POS_EMBEDS = ("sincos", "learned")
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(width=192, depth=12, heads=3),
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),
}


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)*(W/p); each patch flattened as (p, p, C) (MAE order)."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ConfigError(f"image size {h}x{w} is not a multiple of patch size {p}: choose a patch size dividing it.")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)  # (N, C, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, gh, gw, p, p, C)
    return x.reshape(n, gh * gw, p * p * c)  # (N, L, p*p*C)


def unpatchify(x: Tensor, p: int, c: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(N, L, p*p*C) -> (N, C, gh*p, gw*p); ``grid = (gh, gw)``, square by default. Inverse of ``patchify``."""
    n, length, _ = x.shape
    if grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ConfigError(f"{length} patches do not form a square grid: pass grid=(rows, cols).")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, c)  # (N, gh, gw, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, gh, p, gw, p)
    return x.reshape(n, c, gh * p, gw * p)


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): half sines, half cosines of geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding (as in MAE): (gh*gw, dim), rows in ``patchify`` order."""
    if dim % 4:
        raise ConfigError(f"sin-cos position embedding needs a width divisible by 4, got {dim}: "
                          "change the width or use pos_embed='learned'.")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (gh, gw) each
    emb = torch.cat([_sincos_1d(dim // 2, rows.flatten()), _sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.float()  # (L, dim)


class PatchEmbed(nn.Module):
    """Conv patchify + position embedding: (N, C, H, W) -> (N, L, width), L = (H/p)*(W/p).

    The fixed sin-cos table is a non-persistent buffer: it is not in ``state_dict`` and never sent.
    """

    def __init__(self, *, in_channels: int, image_size: int, patch_size: int, width: int,
                 pos_embed: str = "sincos") -> None:
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ConfigError(f"unknown pos_embed {pos_embed!r}: choose one of {list(POS_EMBEDS)}.")
        if image_size % patch_size:
            raise ConfigError(f"image_size={image_size} is not a multiple of patch_size={patch_size}: "
                              "choose a patch size that divides the image size.")
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        table = sincos_pos_embed_2d(width, self.grid)[None] if pos_embed == "sincos" \
            else torch.zeros(1, self.num_patches, width)  # (1, L, width)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        else:
            self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (N, L, width)
        return tokens + self.pos_embed


def make_block(width: int, heads: int, mlp_ratio: float = 4.0) -> nn.TransformerEncoderLayer:
    """One pre-norm ViT block: (N, L, width) -> (N, L, width)."""
    return nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=int(width * mlp_ratio),
                                      dropout=0.0, activation="gelu", batch_first=True, norm_first=True)


def init_vit_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears / patch projection, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


def _check_vit_args(width: int, depth: int, heads: int, mlp_ratio: float) -> None:
    if width < 1 or heads < 1 or width % heads:
        raise ConfigError(f"width={width} must be a positive multiple of heads={heads}: change one of them.")
    if depth < 0:
        raise ConfigError(f"depth={depth} must be >= 0: pass the number of transformer blocks.")
    if mlp_ratio <= 0:
        raise ConfigError(f"mlp_ratio={mlp_ratio} must be positive: pass e.g. 4.")


class VisionTransformer(Encoder):
    """ViT with ``layers = [PatchEmbed, block1, ..., blockD]``; tokens are (N, L, width); pool -> (N, width)."""

    def __init__(self, *, image_size: int, patch_size: int, width: int = 192, depth: int = 12, heads: int = 3,
                 mlp_ratio: float = 4.0, in_channels: int = 3, pos_embed: str = "sincos") -> None:
        _check_vit_args(width, depth, heads, mlp_ratio)
        patch_embed = PatchEmbed(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
                                 width=width, pos_embed=pos_embed)
        blocks = [make_block(width, heads, mlp_ratio) for _ in range(depth)]
        super().__init__([patch_embed, *blocks], [width] * (depth + 1), feature_dim=width,
                         norm=nn.LayerNorm(width, eps=1e-6))
        self.patch_size, self.width, self.heads, self.mlp_ratio = patch_size, width, heads, mlp_ratio
        self.in_channels = in_channels
        init_vit_weights(self)

    @property
    def patch_embed(self) -> PatchEmbed:
        return self.layers[0]  # type: ignore[return-value]

    def pool(self, h: Tensor) -> Tensor:
        """Final LayerNorm, then the mean over tokens: (N, L, width) -> (N, width)."""
        return self.norm(h).mean(dim=1)


def vit_param_count(*, width: int, depth: int, patch_size: int, image_size: int, in_channels: int = 3,
                    mlp_ratio: float = 4.0, pos_embed: str = "sincos") -> int:
    """Analytic parameter count (sin-cos positions are a buffer, not parameters)."""
    hidden = int(width * mlp_ratio)
    num_patches = (image_size // patch_size) ** 2
    patch = in_channels * patch_size**2 * width + width + (num_patches * width if pos_embed == "learned" else 0)
    block = (2 * 2 * width  # two LayerNorms
             + 3 * width * width + 3 * width  # qkv projection
             + width * width + width  # attention output projection
             + width * hidden + hidden + hidden * width + width)  # MLP
    return patch + depth * block + 2 * width  # + final LayerNorm


def vit_block_flops(width: int, num_tokens: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of one block on ``num_tokens`` tokens (2 per multiply-add; norms, softmax, GELU ignored)."""
    hidden = int(width * mlp_ratio)
    projections = 2 * num_tokens * width * (3 * width + width)  # qkv + output projection
    attention = 2 * 2 * num_tokens * num_tokens * width  # Q K^T and A V
    mlp = 2 * 2 * num_tokens * width * hidden
    return projections + attention + mlp


def vit_flops_per_image(*, width: int, depth: int, patch_size: int, image_size: int, in_channels: int = 3,
                        mlp_ratio: float = 4.0, num_tokens: int | None = None) -> int:
    """Forward FLOPs per image: patch embedding on all patches + ``depth`` blocks on ``num_tokens`` tokens.

    ``num_tokens`` defaults to every patch; pass the visible count for an MAE encoder.
    Training costs about 3x this (forward + 2x forward for the backward).
    """
    num_patches = (image_size // patch_size) ** 2
    tokens = num_patches if num_tokens is None else num_tokens
    patch = 2 * num_patches * in_channels * patch_size**2 * width
    return patch + depth * vit_block_flops(width, tokens, mlp_ratio)


def build_vit(*, in_channels: int, image_size: int, preset: str | None = None, **kwargs: Any) -> VisionTransformer:
    """``ARCHS["vit"]``: a ViT from a preset in ``VIT_PRESETS`` plus overrides (``patch_size`` is required)."""
    config = preset_kwargs("vit", VIT_PRESETS, preset, kwargs)
    if "patch_size" not in config:
        raise ConfigError("a ViT needs patch_size: pass e.g. patch_size=4 for 32x32 images or 16 for 224x224.")
    try:
        return VisionTransformer(in_channels=in_channels, image_size=image_size, **config)
    except TypeError as err:
        raise ConfigError(f"bad vit argument ({err}): use patch_size, width, depth, heads, mlp_ratio, "
                          "pos_embed.") from None


__all__ = [
    "PatchEmbed", "VIT_PRESETS", "VisionTransformer", "build_vit", "init_vit_weights", "make_block", "patchify",
    "sincos_pos_embed_2d", "unpatchify", "vit_block_flops", "vit_flops_per_image", "vit_param_count",
]
