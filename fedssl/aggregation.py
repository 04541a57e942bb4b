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


class ServerMomentum:
    """FedAvgM (Hsu et al., 2019): the server treats the averaged client change as a gradient step with momentum.

    ``step(current, averaged)``: delta = averaged - current; v = beta * v + delta; new = current + lr * v, per
    floating tensor (integer tensors take the average's value). ``beta = 0`` and ``lr = 1`` is plain FedAvg
    (returns ``averaged`` itself). The velocities are server state: checkpointed, never sent.
    """

    def __init__(self, beta: float, lr: float) -> None:
        self.beta, self.lr = beta, lr
        self.velocity: dict[str, Tensor] = {}

    @property
    def plain(self) -> bool:
        return self.beta == 0 and self.lr == 1

    def step(self, current: dict[str, Tensor], averaged: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.plain:
            return averaged
        out: dict[str, Tensor] = {}
        for key, avg in averaged.items():
            if not torch.is_floating_point(avg):
                out[key] = avg
                continue
            delta = avg.to(torch.float64) - current[key].to(torch.float64)
            v = self.velocity.get(key)
            v = delta if v is None else v.mul_(self.beta).add_(delta)
            self.velocity[key] = v
            out[key] = (current[key].to(torch.float64) + self.lr * v).to(avg.dtype)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.velocity.items()}  # copies: step() updates its velocities in place

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.velocity = {k: v.to(torch.float64, copy=True) for k, v in state.items()}


def check_upload(upload: dict[str, Tensor], expected: dict[str, Tensor], num_samples: int) -> str | None:
    """Why a client's upload must not be averaged in (None = it fits).

    It must hold exactly the keys of ``expected`` (the server's own tensors of that round), each
    with the same shape and dtype, every floating value finite, and a non-negative sample count
    (the FedAvg weight). A reply from another model, a corrupt one, or one with NaN/inf is refused.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        return f"its sample count {num_samples!r} is not a non-negative integer"
    missing, extra = sorted(set(expected) - set(upload)), sorted(set(upload) - set(expected))
    if missing or extra:
        return f"its keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, want in expected.items():
        got = upload[key]
        if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            return f"{key} has shape {shape}, expected {tuple(want.shape)} {want.dtype}"
        if torch.is_floating_point(got) and not bool(torch.isfinite(got).all()):
            return f"{key} holds NaN or inf"
    return None
