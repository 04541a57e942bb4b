"""The results page's fleet section: which method wins on a fleet of weak devices, in simulated time.

A comparison preset names fleets (:class:`fedssl.compare.FleetSpec`); every federated method runs once on
each, with the kNN monitor on a VALIDATION split each round (``eval.val_fraction``, never the test split) and
the run's simulated clock (:mod:`fedssl.devices.clock`) beside it. Read off each run's own files
(:func:`fleet_summary_of`): the monitor against simulated hours, the simulated time at which the monitor first
reached its random init + 5 points (on the same validation split), the run's simulated time, bytes and energy
per client, and the client-rounds lost to the deadline (late) or to availability (unavailable). The test-split
kNN of the FINAL encoder stands beside its random init, as everywhere on the page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedssl.config import RunConfig, clients_per_round
from fedssl.devices.report import human_seconds, profile_counts
from fedssl.io import atomic_savefig
from fedssl.report import markdown_table

TARGET_GAIN = 0.05  # "time to random init + 5 points": the page's federated goal, on the monitor


def time_to_gain(curve: Sequence[tuple[float, float]], start: float, gain: float = TARGET_GAIN) -> float | None:
    """Simulated seconds at which the monitor first reached ``start + gain`` (None: never in the run).

    ``curve``: (simulated seconds so far, monitor accuracy) after each round, in order.
    """
    return next((seconds for seconds, acc in curve if acc >= start + gain - 1e-12), None)


def fleet_summary_of(cfg: RunConfig, final: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A finished fleet run's figures (see the module's docstring), from its config, final.json and metrics rows."""
    devices = final["devices"]
    start = final["initial"].get("val_knn_acc", final["initial"]["knn_acc"])
    curve = [(float(m.get("sim_seconds_total", 0.0)), float(m["knn_acc"])) for m in metrics
             if m.get("knn_acc") is not None]
    energy = [c["energy_j"] for c in devices["clients"] if "energy_j" in c]
    return {"curve": curve, "monitor_init": start, "time_to_gain": time_to_gain(curve, start),
            "sim_seconds": float(devices["sim_seconds_total"]),
            "energy_j": sum(energy) / len(energy) if energy else None,
            "late": int(sum(m.get("late", 0) for m in metrics)),
            "unavailable": int(sum(m.get("unavailable", 0) for m in metrics)),
            "client_rounds": len(metrics) * clients_per_round(cfg.sample_fraction, cfg.clients),  # sampled
            "fleet_mix": profile_counts(devices), "deadline_s": devices["deadline_s"]}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _reached(row: Mapping[str, Any]) -> str:
    fleet = row["fleet"]
    if fleet["time_to_gain"] is None:
        best = max((acc for _, acc in fleet["curve"]), default=None)
        gap = "" if best is None else f" (best {100 * (best - fleet['monitor_init']):+.2f})"
        return f"not reached{gap}"
    return human_seconds(fleet["time_to_gain"])


def fleet_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One fleet's methods: accuracy beside random init, time to +5, the run's time, bytes, energy, losses."""
    body = []
    for r in sorted(rows, key=_order):
        fleet = r["fleet"]
        energy = fleet["energy_j"]
        body.append([r["label"], _pct(r["knn"]), _pct(r["knn_init"]), f"{100 * (r['knn'] - r['knn_init']):+.2f}",
                     _reached(r), human_seconds(fleet["sim_seconds"]), f"{r['optimizer_steps']:,}",
                     f"{r['comm'] / 2**20:.1f}", "—" if energy is None else f"{energy:.1f}",
                     f"{fleet['late']} / {fleet['unavailable']} of {fleet['client_rounds']}"])
    return markdown_table(["method", "kNN (test)", "random init", "gain", "monitor at random init + 5",
                           "simulated run", "optimizer steps", "MiB / client", "J / client", "late / unavailable"],
                          body)


def _order(row: Mapping[str, Any]) -> tuple[float, str]:
    reached = row["fleet"]["time_to_gain"]
    return (float("inf") if reached is None else reached, row["label"])


def plot_fleet(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """The monitor (validation kNN) of every method against simulated hours (0 h: its random init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.4))
    for i, r in enumerate(sorted(rows, key=lambda r: r["label"])):
        fleet = r["fleet"]
        points = [(0.0, fleet["monitor_init"])] + list(fleet["curve"])
        ax.plot([s / 3600 for s, _ in points], [100 * a for _, a in points], marker="osD^v<>PXh*"[i % 11],
                markersize=3, linewidth=1, label=r["label"])
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("simulated time on the fleet (h; linear below 0.01 h)")
    ax.set_ylabel("kNN on the validation split (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def winner_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """Which method reached random init + 5 points first, and by how much (measured), or that none did."""
    reached = sorted((r for r in rows if r["fleet"]["time_to_gain"] is not None), key=_order)
    if not reached:
        return "No method's monitor reached its random init + 5 points on this fleet within its run."
    first = reached[0]
    text = f"First to random init + 5 points: **{first['label']}** ({human_seconds(first['fleet']['time_to_gain'])})"
    if len(reached) > 1:
        second = reached[1]
        text += f", then {second['label']} ({human_seconds(second['fleet']['time_to_gain'])})"
    missed = [r["label"] for r in rows if r["fleet"]["time_to_gain"] is None]
    return text + (f"; never within the run: {', '.join(missed)}." if missed else ".")


def _versions(rows: Sequence[Mapping[str, Any]]) -> str:
    versions = sorted({str(r.get("code_version", "unrecorded")) for r in rows})
    return f"Fleet runs of code {', '.join(f'`{v}`' for v in versions)}." if versions else ""


def fleet_section(fleets: Sequence[Any], rows: Sequence[Mapping[str, Any]], docs: Path) -> str:
    """The page's "On a fleet" section: per fleet, its table, the winner and the plot (written under docs)."""
    if not fleets:
        return ""
    text = ("## On a fleet: which method wins in simulated time\n\n"
            "Every federated method once more (seed 0), each client now a device of the fleet: the simulated clock "
            "turns the run's measured FLOPs and bytes into compute, transfer and round-trip time on each client's "
            "profile (a synchronous round waits for its slowest client; MocoSFL's steps wait for their slowest client "
            "and the server's step; `fedssl/devices/clock.py`). The kNN monitor reads a VALIDATION split (a fifth of "
            "the training split, held out from the clients) after every round; \"monitor at random init + 5\" is the "
            "simulated time at which it first reached its own random init + 5 points. kNN (test) is the final "
            "encoder's, scored once. Optimizer steps: summed over clients; MiB / client: up + down, mean over clients; "
            "J / client: training energy on the profile's power, mean over clients; late / unavailable: sampled "
            "client-rounds lost to the deadline / to availability. "
            + _versions(rows) + "\n\n")
    for spec in fleets:
        shown = [r for r in rows if r.get("group") == spec.group and r.get("fleet")]
        text += f"### {spec.name}\n\n{spec.description}\n\n"
        if not shown:
            text += "Not run yet.\n\n"
            continue
        plot = plot_fleet(shown, docs / "results" / f"fleet-{spec.slug}.png", spec.name)
        text += (fleet_table(shown) + "\n" + winner_line(shown) + "\n\n"
                 + f"![{spec.name}]({plot.relative_to(docs)})\n\n")
    return text


__all__ = ["TARGET_GAIN", "fleet_section", "fleet_summary_of", "fleet_table", "plot_fleet", "time_to_gain",
           "winner_line"]
