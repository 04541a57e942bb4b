"""The privacy budget of a DP run: (epsilon, delta) after r rounds, from Google's ``dp-accounting`` (RDP).

Why this library: it has the Renyi-DP analysis of the subsampled Gaussian mechanism under sampling WITHOUT
replacement (Wang, Balle, Kasiviswanathan, AISTATS 2019), which is exactly how a round samples its clients (a
fixed-size subset, ``fedssl.engines.rounds.sample_clients``); Opacus's RDP accountant analyses Poisson sampling
only, which a fixed-size sampler does not do. Flower 1.41 wraps the same library for its own DP strategies
(``flwr.serverapp.RdpAccountant``; tests/test_privacy.py checks that both give the same figure).

The model: each round is ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``, composed over the
rounds run, under the replace-one adjacency; where m < N the plain ``GaussianDpEvent(z / 2)`` composed over the
rounds bounds it too (sampling cannot leak more), and the smaller epsilon is reported: the sampled bound is the
looser one when nearly all clients take part (9 of 10 clients, z = 1, 8 rounds: 46.1 sampled against 41.6).
N, the number of clients, is public; neighbouring federations differ in one client's data. The noise std is
z * C on the sum of updates clipped to C; replacing one client's data moves that sum by up to 2C, so the
noise-to-sensitivity ratio the accountant takes is z / 2. With ``noise_multiplier = 0`` (clipping only) epsilon
is infinite. The clients' reported metrics (loss, sample count) are not covered: the guarantee is for the
released models.

Importing ``dp_accounting`` takes about 2 s, so this module is imported only where a DP run needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedssl.config import RunConfig
from fedssl.privacy.dp import clients_per_round

ACCOUNTANT = ("dp-accounting RDP, clients sampled without replacement (or the plain Gaussian bound where "
              "smaller), replace-one adjacency (noise-to-sensitivity ratio z/2)")


def round_event(noise_multiplier: float, sample_size: int, population: int) -> dp_accounting.DpEvent:
    """One round's release: m of N clients sampled without replacement, Gaussian noise z*C on a sum of
    sensitivity 2C (replace-one)."""
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=population, sample_size=sample_size,
        event=dp_accounting.GaussianDpEvent(noise_multiplier / 2))


def epsilon(noise_multiplier: float, delta: float, rounds: int, sample_size: int, population: int,
            orders: Sequence[float] | None = None) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (0 before any; inf without noise). ``orders``: the RDP
    orders (None = the library's default set)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    events = [round_event(noise_multiplier, sample_size, population)]
    if sample_size < population:  # a subsampled round is also at most the plain Gaussian: the tighter bound holds
        events.append(dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    return min(_composed_epsilon(event, rounds, delta, orders) for event in events)


def _composed_epsilon(event: dp_accounting.DpEvent, rounds: int, delta: float,
                      orders: Sequence[float] | None) -> float:
    accountant = RdpAccountant(orders, dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def run_epsilon(cfg: RunConfig, rounds: int) -> float:
    """Epsilon of a run of ``cfg`` after ``rounds`` rounds, at ``privacy.delta``."""
    p = cfg.privacy
    return epsilon(p.noise_multiplier, p.delta, rounds, clients_per_round(cfg.sample_fraction, cfg.clients),
                   cfg.clients)


def privacy_summary(cfg: RunConfig, rounds: int) -> dict[str, Any]:
    """What final.json and the report say of a DP run: the settings, the sampling, epsilon after ``rounds``."""
    p = cfg.privacy
    return {"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier, "delta": p.delta,
            "epsilon": run_epsilon(cfg, rounds), "rounds": rounds, "clients": cfg.clients,
            "clients_per_round": clients_per_round(cfg.sample_fraction, cfg.clients),
            "reproducible_noise": p.reproducible_noise, "accountant": ACCOUNTANT}
