"""Momentum (EMA) copies of a network: freeze, copy, update, and the BYOL tau schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fedssl.errors import ConfigError


def deactivate_requires_grad(module: nn.Module) -> None:
    """Freeze every parameter of ``module`` (a momentum copy is never trained by gradients)."""
    for p in module.parameters():
        p.requires_grad_(False)


def activate_requires_grad(module: nn.Module) -> None:
    """Unfreeze every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(True)


NamedTensors = Iterator[tuple[str, Tensor]]


def _paired(target: NamedTensors, source: NamedTensors) -> Iterator[tuple[Tensor, Tensor]]:
    """Zip two named tensor lists, insisting that they hold the same names and shapes."""
    t_list, s_list = list(target), list(source)
    if [n for n, _ in t_list] != [n for n, _ in s_list]:
        raise ValueError("target and source modules differ in structure: build the target as a copy of the source.")
    for (name, t), (_, s) in zip(t_list, s_list):
        if t.shape != s.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} in target but {tuple(s.shape)} in source.")
        yield t, s


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """target <- source, in place, for parameters AND buffers (e.g. BatchNorm statistics)."""
    for t, s in _paired(target.named_parameters(), source.named_parameters()):
        t.copy_(s)
    for t, s in _paired(target.named_buffers(), source.named_buffers()):
        t.copy_(s)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place: target_params = tau * target_params + (1 - tau) * online_params; buffers are copied."""
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"momentum tau={tau} is outside [0, 1]: pass e.g. 0.99.")
    for t, o in _paired(target.named_parameters(), online.named_parameters()):
        t.mul_(tau).add_(o, alpha=1.0 - tau)
    for t, o in _paired(target.named_buffers(), online.named_buffers()):
        t.copy_(o)


def cosine_tau(step: int, total: int, base_tau: float) -> float:
    """BYOL schedule: tau = 1 - (1 - base_tau) * (cos(pi * step / total) + 1) / 2; base_tau at 0, 1 at ``total``."""
    if total <= 0:
        raise ConfigError(f"total={total} steps must be positive: pass the number of training steps.")
    if not 0.0 <= base_tau <= 1.0:
        raise ConfigError(f"base_tau={base_tau} is outside [0, 1]: pass e.g. 0.99.")
    progress = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


__all__ = ["activate_requires_grad", "copy_weights", "cosine_tau", "deactivate_requires_grad", "ema_update"]
