"""The report's fleet: the profiles, accuracy against simulated time, per client its compute and energy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedssl.config_schema import DeviceProfile
from fedssl.devices.profiles import describe_profile

MAX_CLIENT_ROWS = 20


def human_seconds(seconds: float) -> str:
    """``human_seconds(5400) == "1.50 h"``: s below 2 minutes, min below 2 hours, h above."""
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def profile_counts(devices: Mapping[str, Any]) -> dict[str, int]:
    """final.json's ``devices``: how many clients have each profile, by profile name."""
    counts: dict[str, int] = {}
    for c in devices["clients"]:
        counts[c["profile"]] = counts.get(c["profile"], 0) + 1
    return dict(sorted(counts.items()))


def devices_section(devices: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]],
                    initial: Mapping[str, Any]) -> str:
    """The fleet's profiles, kNN (monitor) against simulated time, and the clients' compute and energy."""
    profiles = "\n".join(f"- {describe_profile(name, DeviceProfile(**p))}" for name, p in devices["profiles"].items())
    server = describe_profile("split server", DeviceProfile(**devices["server"]))
    counts = profile_counts(devices)
    deadline = devices["deadline_s"]
    text = (f"## Devices and the simulated clock\n\nFleet: {', '.join(f'{n} x {p}' for p, n in sorted(counts.items()))}"
            f"; round deadline {human_seconds(deadline) if deadline else 'none'}. Simulated time of the whole run: "
            f"**{human_seconds(devices['sim_seconds_total'])}** (the clock: `fedssl/devices/clock.py`).\n\n"
            f"{profiles}\n- {server}\n\n")
    start = initial.get("knn_acc")
    rows = [["0", "0 s", "—" if start is None else f"{100 * start:.2f}%", "", ""]]
    for m in metrics:
        knn = m.get("knn_acc")
        rows.append([str(m["round"]), human_seconds(m.get("sim_seconds_total", 0.0)),
                     "" if knn is None else f"{100 * knn:.2f}%", str(m.get("late", 0)), str(m.get("unavailable", 0))])
    text += ("kNN (monitor) against simulated time (round 0: the random-init encoder):\n\n"
             + _table(["round", "simulated time", "kNN (monitor)", "late", "unavailable"], rows)
             + "\n![kNN against simulated time](plots/knn_time.png)\n\n")
    energy = any("energy_j" in c for c in devices["clients"])
    shown = devices["clients"][:MAX_CLIENT_ROWS]
    client_rows = [[str(c["client"]), c["profile"], human_seconds(c["compute_s"]), str(c["late_rounds"])]
                   + ([f"{c['energy_j']:.1f} J" if "energy_j" in c else "—"] if energy else []) for c in shown]
    more = (f"\n(first {MAX_CLIENT_ROWS} of {len(devices['clients'])} clients; all in final.json)\n"
            if len(devices["clients"]) > len(shown) else "")
    return text + "Per client over the run (compute on its profile; energy = its training power x compute time):\n\n" \
        + _table(["client", "profile", "compute", "late rounds"] + (["energy"] if energy else []), client_rows) + more


def write_time_plot(plots: Path, metrics: Sequence[Mapping[str, Any]], initial: Mapping[str, Any]) -> None:
    """plots/knn_time.png: the kNN monitor against simulated hours (0: the random-init encoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedssl.io import atomic_savefig

    points = [(m.get("sim_seconds_total", 0.0) / 3600, m["knn_acc"]) for m in metrics if m.get("knn_acc") is not None]
    if initial.get("knn_acc") is not None:
        points.insert(0, (0.0, initial["knn_acc"]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if points:
        ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("simulated time (h)")
    ax.set_ylabel("kNN accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, plots / "knn_time.png")
