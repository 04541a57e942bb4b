"""The simulated clock: what a round would take on real devices, from the ledger's measured costs and the profiles.

Pure functions of ledger rows and :class:`~fedssl.config_schema.DeviceProfile` s, small enough to check by hand.
Units: bytes, FLOP, seconds; a profile's GFLOP/s are 1e9 FLOP/s, its Mbit/s 1e6 bit/s, its RTT milliseconds.

The model (what a FedScale-style simulator assumes, stated so results can be read):

- compute: a client's measured FLOPs per image of a training step (the ledger's ``step_cost`` row: forward and
  backward of every view) times the images it trained, at the profile's sustained GFLOP/s;
- transfer: payload bytes at the profile's link rate, one RTT per exchange, i.e. per message each way (a
  round-based round is one: the download, training, the upload; a split step is one: activations up, gradients
  down; a sync is one: client-nets up, the average down);
- a synchronous round waits for its slowest client; with a deadline it ends at the deadline when a client is late;
- a split round is its steps one after another: each waits for the slowest of its clients (the client's part:
  RTT + forward and backward of its batch + activations up + gradients down) and then the server's step on its
  own profile; then the sync (client-nets up, the average down). Client-net downloads that ride on a round's
  first forward are charged to the sync, where they are the same bytes on the same link.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedssl.config_schema import DeviceProfile
from fedssl.resources.ledger import DOWNLOAD, SERVER_STEP_COST, STEP_COST, UPLOAD

BITS_PER_BYTE = 8


def compute_seconds(flops: float, profile: DeviceProfile) -> float:
    """Seconds to compute ``flops`` FLOP at the profile's sustained rate."""
    return flops / (profile.gflops * 1e9)


def up_seconds(nbytes: float, profile: DeviceProfile) -> float:
    """Seconds to send ``nbytes`` bytes on the profile's uplink."""
    return nbytes * BITS_PER_BYTE / (profile.up_mbps * 1e6)


def down_seconds(nbytes: float, profile: DeviceProfile) -> float:
    """Seconds to receive ``nbytes`` bytes on the profile's downlink."""
    return nbytes * BITS_PER_BYTE / (profile.down_mbps * 1e6)


@dataclass(frozen=True)
class ClientTime:
    """One client's simulated seconds in a round, by part."""

    compute_s: float = 0.0
    up_s: float = 0.0
    down_s: float = 0.0
    latency_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.up_s + self.down_s + self.latency_s

    def times(self, k: float) -> ClientTime:
        """This time ``k`` times over (a client's ``k`` equal steps)."""
        return ClientTime(k * self.compute_s, k * self.up_s, k * self.down_s, k * self.latency_s)

    def __add__(self, other: ClientTime) -> ClientTime:
        return ClientTime(self.compute_s + other.compute_s, self.up_s + other.up_s, self.down_s + other.down_s,
                          self.latency_s + other.latency_s)


def exchange_time(profile: DeviceProfile, *, flops: float, bytes_down: float, bytes_up: float,
                  exchanges: int = 1) -> ClientTime:
    """A client's time for ``exchanges`` round trips moving these bytes, computing ``flops`` FLOP in between."""
    return ClientTime(compute_seconds(flops, profile), up_seconds(bytes_up, profile), down_seconds(bytes_down, profile),
                      exchanges * profile.rtt_ms / 1000.0)


@dataclass(frozen=True)
class RoundTime:
    """A round's simulated wall time and each contacted client's part in it."""

    seconds: float
    clients: Mapping[int, ClientTime]  # client -> its time (a late client: what it would have taken)
    late: tuple[int, ...] = ()


def synchronous_seconds(times: Iterable[float], deadline_s: float, any_late: bool) -> float:
    """A synchronous round: its slowest client, or the deadline (> 0) when a client was late."""
    slowest = max(times, default=0.0)
    return deadline_s if (any_late and deadline_s > 0) else slowest


def step_flops(rows: Sequence[Mapping[str, float]], kind: str = STEP_COST, round_index: int | None = None) -> float:
    """FLOPs per image of the measured step of ``kind`` in force at ``round_index`` (the last such row of that round
    or before; None: the last row) (0 where none was measured). A staged method records each stage's step at the
    stage's first round."""
    found = [row for row in rows if row["kind"] == kind and (round_index is None or row["round"] <= round_index)]
    return float(found[-1]["flops_per_image"]) if found else 0.0


def of_round(rows: Iterable[Mapping[str, float]], round_index: int) -> list[Mapping[str, float]]:
    """The traffic rows (uploads, downloads) of one round."""
    return [row for row in rows if row["round"] == round_index and row["kind"] in (UPLOAD, DOWNLOAD)]


def federated_round_time(rows: Sequence[Mapping[str, float]], profile_of: Callable[[int], DeviceProfile], *,
                         flops_per_image: float, deadline_s: float = 0.0) -> RoundTime:
    """A round-based round from its ledger rows (:func:`of_round`): per client RTT + download + training + upload.

    A client with a download and no upload did not return (dropout, failure) and does not hold the round up;
    one whose download row says ``late`` trained its ``images`` but never sent its upload, and the round waits
    for the deadline.
    """
    down = {int(r["client"]): r for r in rows if r["kind"] == DOWNLOAD}
    up = {int(r["client"]): r for r in rows if r["kind"] == UPLOAD}
    times: dict[int, ClientTime] = {}
    for client, row in down.items():
        profile = profile_of(client)
        if client in up:
            images = float(up[client].get("images", 0))
            times[client] = exchange_time(profile, flops=flops_per_image * images, bytes_down=row["bytes"],
                                          bytes_up=up[client]["bytes"])
        elif row.get("late"):
            times[client] = exchange_time(profile, flops=flops_per_image * float(row.get("images", 0)),
                                          bytes_down=row["bytes"], bytes_up=0.0)
    late = tuple(sorted(c for c, row in down.items() if row.get("late")))
    on_time = [t.total_s for c, t in times.items() if c not in late]
    return RoundTime(synchronous_seconds(on_time, deadline_s, bool(late)), times, late)


@dataclass(frozen=True)
class SplitStepCost:
    """The measured FLOPs per image of a split step: the client's part (forward + backward at the cut) and the
    server's (the rest of the network on the concatenated batch)."""

    client_flops_per_image: float
    server_flops_per_image: float


def split_step_time(profile: DeviceProfile, cost: SplitStepCost, *, images: float, activation_bytes: float,
                    gradient_bytes: float) -> ClientTime:
    """One client's part of one split step: RTT, forward + backward of its ``images``, activations up, gradients
    down."""
    return exchange_time(profile, flops=cost.client_flops_per_image * images, bytes_down=gradient_bytes,
                         bytes_up=activation_bytes)


def split_client_round_time(profile: DeviceProfile, cost: SplitStepCost, *, steps: int, images_per_step: float,
                            activation_bytes: float, gradient_bytes: float, net_bytes_up: float,
                            net_bytes_down: float) -> ClientTime:
    """A client's own part of a split round (what a deadline is held against): ``steps`` steps of
    :func:`split_step_time` (bytes per step) and the sync (its client-nets up; the nets it is sent down)."""
    step = split_step_time(profile, cost, images=images_per_step, activation_bytes=activation_bytes,
                           gradient_bytes=gradient_bytes)
    return step.times(steps) + exchange_time(profile, flops=0.0, bytes_down=net_bytes_down, bytes_up=net_bytes_up)


def split_round_time(rows: Sequence[Mapping[str, float]], profile_of: Callable[[int], DeviceProfile],
                     server: DeviceProfile, cost: SplitStepCost, members: Sequence[Sequence[int]]) -> RoundTime:
    """A split round from its ledger rows (:func:`of_round`) and the clients of each of its steps (``members``).

    Per client the rows give its steps and its images, activation, gradient and client-net bytes over the
    round, so one step trains ``images / steps`` and moves ``activation_bytes / steps`` up and
    ``gradient_bytes / steps`` down. A client marked ``late`` sat the round out (its predicted part exceeded
    the deadline) and holds nothing up.
    """
    up = {int(r["client"]): r for r in rows if r["kind"] == UPLOAD}
    down = {int(r["client"]): r for r in rows if r["kind"] == DOWNLOAD and not r.get("late")}
    per_step: dict[int, ClientTime] = {}
    batch: dict[int, float] = {}
    for client, row in up.items():
        steps = int(row.get("steps", 0))
        if steps:
            batch[client] = float(row.get("images", 0)) / steps
            per_step[client] = split_step_time(profile_of(client), cost, images=batch[client],
                                               activation_bytes=row.get("activation_bytes", 0) / steps,
                                               gradient_bytes=down[client].get("gradient_bytes", 0) / steps)
    seconds, totals = 0.0, {c: ClientTime() for c in set(up) | set(down)}
    for step in members:
        served = [c for c in step if c in per_step]
        if not served:
            continue
        seconds += max(per_step[c].total_s for c in served)
        seconds += compute_seconds(cost.server_flops_per_image * sum(batch[c] for c in served), server)
        for c in served:
            totals[c] = totals[c] + per_step[c]
    sync = {c: exchange_time(profile_of(c), flops=0.0, bytes_down=down[c].get("weight_bytes", 0) if c in down else 0,
                             bytes_up=up[c].get("weight_bytes", 0) if c in up else 0) for c in totals}
    seconds += max((t.total_s for t in sync.values()), default=0.0)
    late = tuple(sorted(int(r["client"]) for r in rows if r["kind"] == DOWNLOAD and r.get("late")))
    return RoundTime(seconds, {c: totals[c] + sync[c] for c in totals}, late)


def split_cost(rows: Sequence[Mapping[str, float]]) -> SplitStepCost:
    """The split step's measured FLOPs per image from the ledger (client: ``step_cost``; server: its own row)."""
    return SplitStepCost(step_flops(rows), step_flops(rows, SERVER_STEP_COST))
