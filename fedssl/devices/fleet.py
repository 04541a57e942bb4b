"""A run's fleet: one device profile per client (seeded, fixed for the run), who is reachable in a round, and
the memory budget every client's profile must meet before training starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedssl.config import RunConfig
from fedssl.config_schema import DeviceProfile
from fedssl.devices.profiles import profile_table
from fedssl.errors import ConfigError
from fedssl.resources.ledger import human_bytes
from fedssl.training import derive_seed

ASSIGN_SEED = 0xDE71CE
AVAILABLE_SEED = 0xA7A1


class BudgetError(ConfigError):
    """A client's profile has less memory than the method's measured client step needs."""


@dataclass(frozen=True)
class Fleet:
    """The profile name of every client (client order), the profiles by name, the split server's, the deadline."""

    names: tuple[str, ...]
    profiles: dict[str, DeviceProfile]
    server: DeviceProfile
    deadline_s: float = 0.0

    def profile(self, client: int) -> DeviceProfile:
        return self.profiles[self.names[client]]


def assign_profiles(mix: dict[str, float], num_clients: int, seed: int) -> tuple[str, ...]:
    """Each client's profile: the mix's shares as exact counts (largest remainder), in a seeded order.

    Depends on the seed, the mix and the number of clients only, so a resumed run gets the same fleet.
    """
    names = sorted(mix)  # independent of the order the mix was written in
    quotas = [mix[name] * num_clients for name in names]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), names[i]))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    ordered = [name for name, count in zip(names, counts) for _ in range(count)]
    order = np.random.default_rng(derive_seed(seed, ASSIGN_SEED)).permutation(num_clients)
    return tuple(ordered[i] for i in order)


def fleet_of(cfg: RunConfig, num_clients: int) -> Fleet | None:
    """The run's fleet (None without ``devices.mix``: no clock, no budget, the run as without devices)."""
    devices = cfg.devices
    if not devices.mix:
        return None
    table = profile_table(devices)
    names = assign_profiles(devices.mix, num_clients, cfg.seed)
    return Fleet(names, {name: table[name] for name in set(names)}, table[devices.server], devices.round_deadline_s)


def available(cfg: RunConfig, fleet: Fleet | None, round_index: int, client: int) -> bool:
    """Whether a client is reachable in a round: with its profile's availability, seeded by (seed, round, client)."""
    if fleet is None:
        return True
    share = fleet.profile(client).availability
    if share >= 1:
        return True
    return bool(np.random.default_rng(derive_seed(cfg.seed, round_index, client, AVAILABLE_SEED)).random() < share)


@dataclass(frozen=True)
class MeasuredStep:
    """The method's measured client step (the ledger's ``step_cost`` row) and the batch setting it was measured at."""

    peak_training_bytes: float  # held before the step + the step's transient peak
    held_bytes: float  # parameters, buffers, grads and optimizer state held when the step began
    batch_key: str  # batch_size | split.client_batch
    batch: int  # the images of the measured step
    min_batch: int  # the smallest value the key takes


def check_memory(cfg: RunConfig, fleet: Fleet | None, step: MeasuredStep, *, split: bool) -> None:
    """BudgetError naming the smallest profile whose memory is below the measured step's need, and what fits."""
    if fleet is None:
        return
    short = sorted((fleet.profiles[n].memory_mib, n) for n in set(fleet.names)
                   if fleet.profiles[n].memory_mib * 2**20 < step.peak_training_bytes)
    if not short:
        return
    memory_mib, name = short[0]
    clients = sum(n == name for n in fleet.names)
    raise BudgetError(f"{clients} of {len(fleet.names)} clients have profile '{name}' with {memory_mib:g} MiB, but "
                      f"{cfg.method}'s measured client step needs {human_bytes(step.peak_training_bytes)} "
                      f"({human_bytes(step.held_bytes)} held + the step's peak, at {step.batch_key}={step.batch}); "
                      f"fits: {', or '.join(what_fits(cfg, step, memory_mib * 2**20, split=split))}")


def what_fits(cfg: RunConfig, step: MeasuredStep, budget_bytes: float, *, split: bool) -> list[str]:
    """Settings that fit ``budget_bytes``: the largest batch by the measured step's transient scaled linearly with
    the batch (an estimate), a shallower cut (split methods), a layer-wise method (round-based ones)."""
    hints = []
    transient = step.peak_training_bytes - step.held_bytes
    if budget_bytes > step.held_bytes and transient > 0:
        batch = int(step.batch * (budget_bytes - step.held_bytes) / transient)
        if step.min_batch <= batch < step.batch:
            need = step.held_bytes + transient * batch / step.batch
            hints.append(f"--set {step.batch_key}={batch} (about {human_bytes(need)}, scaled from the measured step)")
    if split and cfg.split.cut > 1:
        hints.append(f"a shallower cut (--set split.cut={cfg.split.cut - 1})")
    if not split and cfg.method != "lw-fedssl":
        hints.append("a layer-wise method that trains one block at a time (--method lw-fedssl)")
    return hints or [f"a profile with at least {human_bytes(step.peak_training_bytes)} of memory"]
