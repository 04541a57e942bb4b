"""Projection and prediction heads: one configurable MLP and the factories the methods name.

Every factory takes its dims and a ``norm`` (``"batch"``, ``"layer"``, ``"group"`` or ``None``):
BatchNorm needs more than one sample per batch in training, so a head that runs
on a single client's tiny batch should pass ``"group"``, ``"layer"`` or ``None``.
"""

from __future__ import annotations

from torch import nn

from fedssl.errors import ConfigError
from fedssl.models.resnet import group_norm_groups

HEAD_NORMS = ("batch", "layer", "group", None)


def make_norm1d(norm: str, dim: int, affine: bool = True) -> nn.Module:
    """A norm over (N, dim) features."""
    if norm == "batch":
        return nn.BatchNorm1d(dim, affine=affine)
    if norm == "layer":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(dim), dim, affine=affine)
    raise ConfigError(f"unknown head norm {norm!r}: choose one of {list(HEAD_NORMS)}.")


class MLPHead(nn.Sequential):
    """(N, in_dim) -> (N, out_dim): ``num_layers`` linears; every hidden one is followed by norm + ReLU.

    ``last_norm`` appends a non-affine norm after the last linear (MoCo v3 projector).
    A linear that feeds a BatchNorm has no bias (the norm's shift replaces it).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 norm: str | None = None, last_norm: bool = False) -> None:
        if norm not in HEAD_NORMS:
            raise ConfigError(f"unknown head norm {norm!r}: choose one of {list(HEAD_NORMS)}.")
        if num_layers < 1:
            raise ConfigError(f"num_layers={num_layers} must be >= 1: pass 2 or 3 for a projection head.")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ConfigError(f"head dims ({in_dim}, {hidden_dim}, {out_dim}) must be positive: fix the head sizes.")
        if last_norm and norm is None:
            raise ConfigError("last_norm=True needs a norm: pass norm='batch', 'layer' or 'group', or last_norm=False.")
        modules: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            is_last = i == num_layers - 1
            normed = norm is not None and (last_norm or not is_last)
            modules.append(nn.Linear(d_in, d_out, bias=not (normed and norm == "batch")))
            if normed:
                modules.append(make_norm1d(norm, d_out, affine=not is_last))  # type: ignore[arg-type]
            if not is_last:
                modules.append(nn.ReLU(inplace=True))
        super().__init__(*modules)
        self.in_dim, self.out_dim = in_dim, out_dim


def mocov2_projector(in_dim: int, hidden_dim: int = 512, out_dim: int = 128, *, norm: str | None = None) -> MLPHead:
    """MoCo v2: Linear-ReLU-Linear (no norm by default)."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=2, norm=norm)


def mocov3_projector(in_dim: int, hidden_dim: int = 512, out_dim: int = 256, *, num_layers: int = 3,
                     norm: str | None = "batch") -> MLPHead:
    """MoCo v3: ``num_layers`` linears with BN + ReLU between, ending in a non-affine BN (3 for ViT, 2 for ResNet)."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=num_layers, norm=norm, last_norm=norm is not None)


def mocov3_predictor(in_dim: int = 256, hidden_dim: int = 512, out_dim: int = 256, *,
                     norm: str | None = "batch") -> MLPHead:
    """MoCo v3 predictor: Linear-BN-ReLU-Linear."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=2, norm=norm)


def byol_head(in_dim: int, hidden_dim: int = 512, out_dim: int = 256, *, norm: str | None = "batch") -> MLPHead:
    """BYOL projector / predictor: Linear-BN-ReLU-Linear."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=2, norm=norm)


def simclr_projector(in_dim: int, hidden_dim: int = 512, out_dim: int = 128, *,
                     norm: str | None = "batch") -> MLPHead:
    """SimCLR projector: Linear-BN-ReLU-Linear."""
    return MLPHead(in_dim, hidden_dim, out_dim, num_layers=2, norm=norm)


__all__ = [
    "HEAD_NORMS", "MLPHead", "byol_head", "make_norm1d", "mocov2_projector", "mocov3_predictor",
    "mocov3_projector", "simclr_projector",
]
