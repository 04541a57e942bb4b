"""The run report: a markdown page with the result, the client cost, the rounds and the clients' data.

Written at the end of every run (and again by ``fedssl report RUN_DIR``) from
the run's own files, so that a report always describes what is on disk.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedssl.config import RunConfig, dumps_toml, to_dict
from fedssl.devices.fleet import fleet_of
from fedssl.devices.report import devices_section, human_seconds, write_time_plot
from fedssl.devices.timeline import fleet_summary
from fedssl.io import atomic_savefig, atomic_write_text
from fedssl.resources import (DOWNLOAD, REFERENCE_STEP_COST, SERVER_STEP_COST, STEP_COST, UPLOAD, Ledger, human_bytes,
                              human_flops)
from fedssl.errors import FedSSLError
from fedssl.run_dir import RunOutcome, open_run_dir, read_jsonl

MAX_HISTOGRAM_ROWS = 20


@dataclass(frozen=True)
class ClientCost:
    """What one client holds, computes and sends (worst client where clients differ)."""

    param_bytes: int
    peak_training_bytes: int
    estimated_bytes: int
    flops_per_image: float
    mean_up_per_round: float
    mean_down_per_round: float
    mean_total_per_client: float
    max_total_per_client: float
    server_flops_per_image: float | None = None  # split methods: what the server computes per image



def client_cost(ledger: Ledger) -> ClientCost | None:
    """Read the client cost off the ledger (None if no step was measured)."""
    steps = [r for r in ledger.rows if r["kind"] == STEP_COST]
    if not steps:
        return None
    summary = ledger.summary()
    participations = max(1, sum(r["kind"] == UPLOAD for r in ledger.rows))
    total_up = sum(r["bytes"] for r in ledger.rows if r["kind"] == UPLOAD)
    total_down = sum(r["bytes"] for r in ledger.rows if r["kind"] == DOWNLOAD)
    server = [r for r in ledger.rows if r["kind"] == SERVER_STEP_COST]
    return ClientCost(
        param_bytes=int(max(r["param_bytes"] for r in steps)),
        peak_training_bytes=int(summary["peak_training_bytes_max"]),
        estimated_bytes=int(summary["estimated_bytes_max"]),
        flops_per_image=float(summary["flops_per_image_max"]),
        mean_up_per_round=total_up / participations, mean_down_per_round=total_down / participations,
        mean_total_per_client=summary["comm_bytes_mean"], max_total_per_client=summary["comm_bytes_max"],
        server_flops_per_image=float(server[-1]["flops_per_image"]) if server else None)


def _pct(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


RESULT_HEADER = ["", "raw pixels", "random init", "trained", "trained - random init"]
_SCORES = (("knn_acc", "kNN accuracy, test split"), ("probe_acc", "linear probe, test split"),
           ("val_knn_acc", "kNN accuracy, validation split"), ("val_probe_acc", "linear probe, validation split"))


def _points(value: Any) -> str:
    return "—" if value is None else f"{100 * value:+.2f} points"


def result_rows(initial: dict[str, Any], final: dict[str, Any]) -> list[list[str]]:
    """One row per score the run has: raw pixels, the random-init encoder of the FINAL architecture, the
    trained one and the difference (``RESULT_HEADER``). Runs from before the pixels baseline show "—"."""
    pixels = initial.get("pixels", {})
    rows = []
    for key, label in _SCORES:
        if final.get(key) is None and key.startswith("val_"):
            continue
        start, end = initial.get(key), final.get(key)
        gain = None if start is None or end is None else end - start
        rows.append([label, _pct(pixels.get(key)), _pct(start), _pct(end), _points(gain)])
    return rows


def learning_verdict(initial: dict[str, Any], final: dict[str, Any]) -> str:
    """A sentence when the trained encoder is no better than its random init (or raw pixels); "" otherwise."""
    start, end = initial.get("knn_acc"), final.get("knn_acc")
    if start is None or end is None:
        return ""
    if end < start:
        return (f"**Did not learn: final kNN below random init** ({_pct(end)} vs {_pct(start)} for the untrained "
                "encoder of the same architecture).")
    pixels = initial.get("pixels", {}).get("knn_acc")
    if pixels is not None and end < pixels:
        return f"**Below raw pixels:** the trained encoder's kNN ({_pct(end)}) is below the pixels' ({_pct(pixels)})."
    return ""


def result_section(initial: dict[str, Any], final: dict[str, Any]) -> str:
    verdict = learning_verdict(initial, final)
    return ("## Result: the final encoder, frozen\n\n" + (f"{verdict}\n\n" if verdict else "")
            + "kNN: cosine, k and T from the config, the training split as the bank; probe: linear, fixed epochs. "
              "Random init is the untrained encoder of the same (final) architecture; raw pixels are the normalised "
              "images themselves.\n\n" + markdown_table(RESULT_HEADER, result_rows(initial, final)))


def cost_section(cost: ClientCost | None) -> str:
    if cost is None:
        return ""
    rows = [["parameters + buffers held", human_bytes(cost.param_bytes)],
            ["peak training memory (measured on a real step)", human_bytes(cost.peak_training_bytes)],
            ["analytic estimate (params + grads + optimizer + saved activations)", human_bytes(cost.estimated_bytes)],
            ["FLOPs per image of a training step (measured)", human_flops(cost.flops_per_image)],
            *([["server FLOPs per image of its part of the step (measured)",
                human_flops(cost.server_flops_per_image)]] if cost.server_flops_per_image is not None else []),
            ["bytes up per client per round of participation (mean)", human_bytes(cost.mean_up_per_round)],
            ["bytes down per client per round of participation (mean)", human_bytes(cost.mean_down_per_round)],
            ["bytes up + down per client over the run (mean / max)",
             f"{human_bytes(cost.mean_total_per_client)} / {human_bytes(cost.max_total_per_client)}"]]
    return "## Client cost\n\n" + markdown_table(["per client", "value"], rows)


def reference_section(name: str, ledger: Ledger, cost: ClientCost | None) -> str:
    """This method's client cost beside its reference's (``Method.reference_cost``), measured the same way."""
    rows = [r for r in ledger.rows if r["kind"] == REFERENCE_STEP_COST]
    if not rows or cost is None or not name:
        return ""
    ref = rows[-1]
    uploads = [r for r in ledger.rows if r["kind"] == UPLOAD]
    participations = len(uploads) / max(1, len({r["client"] for r in uploads}))  # rounds per client (mean)
    ref_comm = 2 * ref["payload_bytes"] * participations

    def ratio(theirs: float, ours: float) -> str:
        return f"{theirs / ours:.2f}x" if ours > 0 else "—"

    table = markdown_table(["per client", "this run", "reference", "reference / this run"], [
        ["peak training memory (measured on a real step)", human_bytes(cost.peak_training_bytes),
         human_bytes(ref["peak_training_bytes"]), ratio(ref["peak_training_bytes"], cost.peak_training_bytes)],
        ["FLOPs per image of a training step (measured)", human_flops(cost.flops_per_image),
         human_flops(ref["flops_per_image"]), ratio(ref["flops_per_image"], cost.flops_per_image)],
        ["bytes up + down per client over the run (mean)", human_bytes(cost.mean_total_per_client),
         human_bytes(ref_comm), ratio(ref_comm, cost.mean_total_per_client)]])
    return (f"## Client cost vs the reference: {name}\n\nThe reference's step is measured on the same client's data "
            f"at the start of the run; its communication is its real payload ({human_bytes(ref['payload_bytes'])} each "
            f"way) times the {participations:.1f} rounds a client took part in.\n\n" + table)


INVERSION_FILE = "inversion.json"  # written by ``fedssl attack`` (fedssl.privacy.inversion)


def _scores(value: dict[str, float]) -> list[str]:
    return [f"{value['psnr']:.2f} dB", f"{value['ssim']:.3f}"]


def inversion_section(folder: Path) -> str:
    """The section "What a split server can see": the inversion attack's table and picture ("" until
    ``fedssl attack`` has run on this folder)."""
    file = folder / INVERSION_FILE
    if not file.is_file():
        return ""
    result = json.loads(file.read_text())
    settings = result["settings"]
    rows = [[f"{r['cut']}" + (" (this run)" if r["cut"] == result["run_cut"] else ""),
             human_bytes(r["client_peak_training_bytes"]), "x".join(map(str, r["activation_shape"])),
             *_scores(r["trained"]), *_scores(r["random_init"])] for r in result["rows"]]
    floor = result["floor"]
    return ("## What a split server can see\n\n"
            f"`fedssl attack`: for each cut the server takes the client layers of the final encoder (frozen, as it "
            f"holds them after a sync), trains a decoder from their activations back to images on its OWN images "
            f"({result['aux']}, never a client's) for {settings['steps']} steps, then decodes the activations of "
            f"{result['client_images']} of the clients' training images. PSNR and SSIM against the originals (mean "
            "per image, pixels in [0, 1], torchmetrics): higher = more of the image reaches the server. Floor, "
            f"using no activation (the auxiliary set's mean image): {floor['psnr']:.2f} dB, SSIM "
            f"{floor['ssim']:.3f}.\n\n"
            + markdown_table(["cut", "client peak training memory (measured)", "activation sent (C x H x W)",
                              "PSNR, trained", "SSIM, trained", "PSNR, random init", "SSIM, random init"], rows)
            + f"\n![inversion]({result['figure']})\n")


def figures_section(title: str, figures: list[str]) -> str:
    """The method's own figures (``Method.write_round_figures``), paths relative to the report."""
    if not figures:
        return ""
    return f"## {title}\n\n" + "\n".join(f"![{Path(f).stem}]({f})" for f in figures) + "\n"


def method_figures(folder: Path) -> list[str]:
    """The PNGs a method wrote into the run's figures/ folder, in natural order (stage2 before stage10)."""
    def natural(path: Path) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    return [f"{folder.name}/{p.name}" for p in sorted(folder.glob("*.png"), key=natural)]


def rounds_section(metrics: list[dict[str, Any]]) -> str:
    """One row per round: columns for the clients that dropped out, failed (no usable reply) or were rejected
    (an upload that does not fit the model), where any did; the payload bytes, and beside them the bytes of the
    Flower messages on the wire where the engine measured them."""
    faults = [k for k in ("dropped", "failed", "rejected", "late", "unavailable") if any(m.get(k) for m in metrics)]
    wire = any("wire_up" in m for m in metrics)
    clock = any("sim_seconds" in m for m in metrics)
    dp = any("epsilon" in m for m in metrics)
    rows = [[str(m["round"]), f"{m['loss']:.4f}", _pct(m.get("knn_acc")), str(m["clients"])]
            + [str(m.get(k, 0)) for k in faults]
            + ([_epsilon(m.get("epsilon")), str(m.get("clipped", 0))] if dp else [])
            + ([human_seconds(m.get("sim_seconds", 0.0))] if clock else [])
            + [f"{m['images_per_s']:.0f}", human_bytes(m["bytes_up"]), human_bytes(m["bytes_down"])]
            + ([human_bytes(m.get("wire_up", 0)), human_bytes(m.get("wire_down", 0))] if wire else [])
            for m in metrics]
    header = (["round", "loss", "kNN (monitor)", "clients"] + faults + (["epsilon", "clipped"] if dp else [])
              + (["simulated time"] if clock else [])
              + ["images/s", "bytes up", "bytes down"]
              + (["up on the wire", "down on the wire"] if wire else []))
    return "## Rounds\n\n" + markdown_table(header, rows)


def _epsilon(value: Any) -> str:
    return "—" if value is None else ("∞" if math.isinf(value) else f"{value:.3g}")


def privacy_section(privacy: dict[str, Any] | None) -> str:
    """A DP run's settings and budget (``fedssl.privacy.accountant.privacy_summary``); "" without DP."""
    if not privacy:
        return ""
    p = privacy
    noise = ("no noise (clipping only): no privacy guarantee" if not p["noise_multiplier"] else
             f"(epsilon, delta) = ({_epsilon(p['epsilon'])}, {p['delta']:g}) after {p['rounds']} rounds")
    return ("## Privacy: client-level DP-FedAvg\n\n"
            f"Each client's update clipped to L2 norm {p['clip_norm']:g}; Gaussian noise of std "
            f"{p['noise_multiplier']:g} x {p['clip_norm']:g} on the sum over the {p['clients_per_round']} clients a "
            f"round samples (of {p['clients']}), averaged uniformly. {noise}; accountant: {p['accountant']}. "
            "The guarantee covers the released models, not the clients' reported metrics (loss, sample count)"
            + (", and the noise is derived from the config's seed (reproducible_noise)" if p["reproducible_noise"]
               else "") + ".\n")


def histogram_section(histogram: np.ndarray, profiles: tuple[str, ...] = ()) -> str:
    """Per-client class counts, and each client's device profile where the run has a fleet (the first clients as
    a table; all of them in the PNG)."""
    shown = histogram[:MAX_HISTOGRAM_ROWS]
    rows = [[str(i)] + ([profiles[i]] if profiles else []) + [str(int(h.sum())), str(int((h > 0).sum()))]
            + [str(int(v)) for v in h] for i, h in enumerate(shown)]
    header = ["client"] + (["profile"] if profiles else []) + ["images", "classes"] + [
        f"c{j}" for j in range(histogram.shape[1])]
    sizes = histogram.sum(axis=1)
    note = (f"{histogram.shape[0]} clients; images per client min {sizes.min()}, median {int(np.median(sizes))}, "
            f"max {sizes.max()}; classes per client mean {(histogram > 0).sum(axis=1).mean():.2f}.")
    more = f"\n(first {MAX_HISTOGRAM_ROWS} clients shown; all in plots/clients.png)\n" if len(histogram) > len(shown) else ""
    return "## Clients: class histogram\n\n" + note + "\n\n" + markdown_table(header, rows) + more + \
        "\n![clients](plots/clients.png)\n"


def write_plots(plots: Path, metrics: list[dict[str, Any]], histogram: np.ndarray,
                initial: dict[str, Any] | None = None) -> None:
    """plots/loss.png, plots/knn.png (round 0 = the random-init encoder) and plots/clients.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    rounds = [m["round"] for m in metrics]
    for name, key, label in (("loss", "loss", "SSL loss"), ("knn", "knn_acc", "kNN accuracy")):
        points = [(m["round"], m[key]) for m in metrics if m.get(key) is not None]
        if initial and initial.get(key) is not None:
            points.insert(0, (0, initial[key]))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if points:
            ax.plot(*zip(*points), marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_xlim(0, max(rounds, default=1) + 0.5)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, plots / f"{name}.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.imshow(histogram.T, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    ax.set_title("images per class and client")
    fig.tight_layout()
    atomic_savefig(fig, plots / "clients.png")


def step_time_section(metrics: list[dict[str, Any]]) -> str:
    """A split method on Flower: each round's measured seconds per step and where they go ("" otherwise)."""
    rows = [m for m in metrics if "step_seconds" in m]
    if not rows:
        return ""
    table = [[str(m["round"]), str(m["steps"])]
             + [f"{m[k]:.3f}" for k in ("step_seconds", "forward_seconds", "backward_seconds", "client_seconds")]
             + [f"{m['step_seconds'] - m['forward_seconds'] - m['backward_seconds']:.3f}", f"{m['sync_seconds']:.2f}"]
             for m in rows]
    header = ["round", "steps", "s / step", "forward exchange", "backward exchange", "  of which client compute",
              "server step", "sync (s / round)"]
    return ("## Seconds per step (measured)\n\nWall-clock seconds in the server, per step: the two exchanges "
            "(push, the nodes' polling and compute, the replies), the slowest client's own compute in them (as its "
            "node measured it), and the server's step (what the exchanges leave); the sync once per round.\n\n"
            + markdown_table(header, table))


def render_report(cfg: RunConfig, metrics: list[dict[str, Any]], initial: dict[str, Any], final: dict[str, Any],
                  ledger: Ledger, histogram: np.ndarray, figures: list[str] | None = None,
                  privacy: dict[str, Any] | None = None, attack: str = "") -> str:
    from fedssl.methods import METHODS  # here: the registry imports every method

    head = (f"# fedssl run: {cfg.method} on {cfg.dataset}\n\n"
            f"{1 if METHODS[cfg.method].pooled_data else cfg.clients} client(s), partition `{cfg.partition}` "
            f"(alpha {cfg.alpha}), {cfg.rounds} rounds, sample fraction {cfg.sample_fraction}, "
            f"backbone `{cfg.model.arch}` width {cfg.model.width}, seed {cfg.seed}. "
            "Accuracies are of the FINAL encoder (no selection on the test split).\n\n")
    described = METHODS[cfg.method].describe(cfg)
    head += f"{described}\n\n" if described else ""
    plots = "## Curves\n\n![loss](plots/loss.png) ![kNN](plots/knn.png)\n\n"
    config = ("## Config\n\n<details><summary>the resolved config of this run (config.toml)</summary>\n\n"
              "```toml\n" + dumps_toml(to_dict(cfg)) + "```\n\n</details>\n")
    cost = client_cost(ledger)
    fleet = fleet_of(cfg, len(histogram))
    fleet_text = "" if fleet is None else devices_section(fleet_summary(ledger.rows, fleet, metrics), metrics, initial)
    return "\n".join([head, result_section(initial, final), privacy_section(privacy), cost_section(cost),
                      reference_section(METHODS[cfg.method].reference_name(cfg), ledger, cost), attack, fleet_text,
                      rounds_section(metrics), step_time_section(metrics), plots,
                      figures_section(METHODS[cfg.method].figures_title, figures or []),
                      histogram_section(histogram, fleet.names if fleet else ()), config])


def write_report(outcome: RunOutcome, cfg: RunConfig, privacy: dict[str, Any] | None = None) -> Path:
    """report.md + plots for a finished run (``privacy``: final.json's, for a DP run)."""
    write_plots(outcome.run.plots, outcome.metrics, outcome.histogram, outcome.initial)
    if cfg.devices.mix:
        write_time_plot(outcome.run.plots, outcome.metrics, outcome.initial)
    text = render_report(cfg, outcome.metrics, outcome.initial, outcome.final, outcome.ledger, outcome.histogram,
                         method_figures(outcome.run.figures), privacy, inversion_section(outcome.run.path))
    atomic_write_text(outcome.run.report, text)
    return outcome.run.report


def finish_run(outcome: RunOutcome, cfg: RunConfig) -> None:
    """final.json (evaluations, ledger summary, class histogram) and the report."""
    from fedssl.version import code_version

    summary = {"initial": outcome.initial, "final": outcome.final, "ledger": outcome.ledger.summary(),
               "histogram": outcome.histogram.tolist(), "code_version": code_version()}
    fleet = fleet_of(cfg, len(outcome.histogram))
    if fleet is not None:  # the clients' profiles, compute and energy; accuracy against time is in metrics.jsonl
        summary["devices"] = fleet_summary(outcome.ledger.rows, fleet, outcome.metrics)
    if cfg.privacy.enabled:  # the DP settings and epsilon after the run's rounds
        from fedssl.privacy.accountant import privacy_summary  # dp-accounting: imported by DP runs only

        summary["privacy"] = privacy_summary(cfg, len(outcome.metrics))
    atomic_write_text(outcome.run.final, json.dumps(summary, indent=1, sort_keys=True))
    write_report(outcome, cfg, summary.get("privacy"))


def regenerate_report(path: str | Path) -> Path:
    """Rewrite report.md and the plots of a finished run from its files."""
    run, cfg = open_run_dir(path)
    if not run.final.is_file():
        raise FedSSLError(f"{run.path} has not finished (no final.json); finish it with fedssl run --resume {run.path}")
    final = json.loads(run.final.read_text())
    outcome = RunOutcome(run, read_jsonl(run.metrics), final["initial"], final["final"], Ledger.from_jsonl(run.ledger),
                         np.asarray(final["histogram"]))
    return write_report(outcome, cfg, final.get("privacy"))
