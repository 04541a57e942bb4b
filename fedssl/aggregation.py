"""Server-side aggregation of client uploads."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg: sum_i w_i * state_i / sum_i w_i for floating tensors (accumulated in float64).

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are not averaged: the
    first state's value is kept. All states must have the same keys and shapes.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights of an aggregation must sum to a positive number")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc.add_(state[key].to(torch.float64), alpha=float(w) / total)
        out[key] = acc.to(first.dtype)
    return out
