"""A run on its fleet, read off the ledger: each round's simulated seconds (the metrics' ``sim_seconds``) and,
per client, its profile, compute seconds and energy over the run (final.json's ``devices``, the report)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fedssl.devices.clock import (RoundTime, compute_seconds, federated_round_time, of_round, split_cost,
                                  split_round_time, step_flops)
from fedssl.devices.fleet import Fleet
from fedssl.resources.ledger import DOWNLOAD, UPLOAD

Rows = Sequence[Mapping[str, Any]]


def round_time(rows: Rows, fleet: Fleet, round_index: int,
               members: Sequence[Sequence[int]] | None = None) -> RoundTime:
    """The simulated time of one round: a round-based one, or (given the clients of each step) a split one."""
    traffic = of_round(rows, round_index)
    if members is None:
        return federated_round_time(traffic, fleet.profile, flops_per_image=step_flops(rows, round_index=round_index),
                                    deadline_s=fleet.deadline_s)
    return split_round_time(traffic, fleet.profile, fleet.server, split_cost(rows), members)


def clock_columns(time: RoundTime, fleet: Fleet, before_s: float) -> dict[str, float]:
    """The metrics row's clock: the round's simulated seconds, the run's so far, the clients' energy this round."""
    row = {"sim_seconds": time.seconds, "sim_seconds_total": before_s + time.seconds}
    if any(fleet.profile(c).power_w for c in time.clients):
        row["sim_energy_j"] = sum(t.compute_s * fleet.profile(c).power_w for c, t in time.clients.items())
    return row


def client_compute_s(rows: Rows, fleet: Fleet) -> dict[int, float]:
    """Per client, the simulated seconds it computed over the run (what its energy is drawn over): the images of
    its uploads, and of the rounds it was late in (it trained; its upload was never sent)."""
    flops = {r: step_flops(rows, round_index=r) for r in {int(row["round"]) for row in rows}}
    out = {c: 0.0 for c in range(len(fleet.names))}
    for row in rows:
        client = int(row["client"])
        if client >= 0 and (row["kind"] == UPLOAD or (row["kind"] == DOWNLOAD and row.get("late"))):
            out[client] += compute_seconds(flops[int(row["round"])] * float(row.get("images", 0)), fleet.profile(client))
    return out


def fleet_summary(rows: Rows, fleet: Fleet, metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """final.json's ``devices``: the profiles in use, per client its profile / compute seconds / energy / late
    rounds, and the run's simulated seconds."""
    compute = client_compute_s(rows, fleet)
    late = {c: 0 for c in compute}
    for row in rows:
        if row["kind"] == DOWNLOAD and row.get("late"):
            late[int(row["client"])] += 1
    clients = []
    for c, seconds in compute.items():
        power = fleet.profile(c).power_w
        clients.append({"client": c, "profile": fleet.names[c], "compute_s": seconds, "late_rounds": late[c],
                        **({"energy_j": seconds * power} if power else {})})
    return {"profiles": {name: dataclasses.asdict(p) for name, p in sorted(fleet.profiles.items())},
            "server": dataclasses.asdict(fleet.server), "deadline_s": fleet.deadline_s, "clients": clients,
            "sim_seconds_total": float(metrics[-1].get("sim_seconds_total", 0.0)) if metrics else 0.0}
