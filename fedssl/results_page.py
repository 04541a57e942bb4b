"""The results page (docs/RESULTS.md): every method of a comparison preset, accuracy against client cost.

Rows come from :func:`fedssl.compare.run_comparison` (each read off its run directory);
runs of the same method and setting with different seeds are folded into mean and spread.
The page holds one table, two plots (accuracy vs client memory, accuracy vs communication,
with the Pareto front), the seed papers' headline numbers beside ours, and the reliability
section (:mod:`fedssl.reliability`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedssl.compare import ComparePreset
from fedssl.io import atomic_savefig
from fedssl.report import markdown_table
from fedssl.resources import human_bytes, human_flops

HEADLINE_GROUP = "Dirichlet 0.5, 10 clients"  # the setting the plots show


def fold_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, label): accuracies as mean and population spread over seeds, costs as means."""
    folded: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        folded.setdefault((row["group"], row["label"]), []).append(row)
    out = []
    for (group, label), runs in folded.items():
        row: dict[str, Any] = {"group": group, "label": label, "method": runs[0]["method"], "seeds": len(runs)}
        for key in ("knn", "probe", "finetune", "knn_init"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_spread"] = statistics.pstdev(values) if len(values) > 1 else None
        for key in ("memory", "flops", "comm", "train_seconds"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        out.append(row)
    return out


def _acc(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    spread = row.get(f"{key}_spread")
    return f"{100 * value:.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def results_table(rows: Sequence[dict[str, Any]], finetune: bool) -> str:
    header = ["setting", "method", "kNN", "linear probe", *(["fine-tune"] if finetune else []), "client peak memory",
              "client FLOPs/img", "bytes per client (run)", "training time"]
    body = [[r["group"], r["label"], _acc(r, "knn"), _acc(r, "probe"), *([_acc(r, "finetune")] if finetune else []),
             human_bytes(r["memory"]) if r["memory"] is not None else "—",
             human_flops(r["flops"]) if r["flops"] is not None else "—",
             human_bytes(r["comm"]) if r["comm"] else "— (pooled)", f"{r['train_seconds']:.0f} s"] for r in rows]
    return markdown_table(header, body)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both (lower cost and higher accuracy), by cost."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def plot_tradeoff(rows: Sequence[dict[str, Any]], cost_key: str, xlabel: str, path: Path, title: str) -> Path:
    """kNN accuracy vs a client cost in MiB (log scale) for the headline setting, the Pareto front drawn; written
    atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["group"] == HEADLINE_GROUP and r.get(cost_key) and r.get("knn") is not None]
    ceilings = [r for r in rows if r["group"] == "pooled data" and r.get("knn") is not None]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    mib = [(r[cost_key] / 2**20, 100 * r["knn"]) for r in shown]
    markers = "osD^v<>PXh*"  # colour and marker together tell the methods apart in the legend
    for i, (r, (x, y)) in enumerate(zip(shown, mib)):
        ax.scatter(x, y, s=40, marker=markers[i % len(markers)], label=f"{r['label']}: {y:.1f}%")
    front = pareto_front(mib)
    if front:
        ax.step(*zip(*front), where="post", color="black", alpha=0.4, linewidth=1)
        ax.scatter(*zip(*front), s=170, facecolors="none", edgecolors="black", alpha=0.5,
                   label="Pareto front (nothing cheaper is as accurate)")
    for r, style in zip(ceilings, ("--", ":", "-.")):
        ax.axhline(100 * r["knn"], linestyle=style, linewidth=0.8, color="grey",
                   label=f"{r['label']}: {100 * r['knn']:.1f}%")
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("kNN accuracy of the final encoder (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def _find(rows: Sequence[dict[str, Any]], label: str, group: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["label"] == label and r["group"] == group), None)


def papers_section(rows: Sequence[dict[str, Any]]) -> str:
    """The seed papers' headline numbers beside ours (where a row of ours corresponds), and why they differ."""
    def ours(label: str, group: str, key: str = "probe") -> str:
        row = _find(rows, label, group)
        return _acc(row, key) if row else "not in this preset"

    def ratio(label: str, key: str, reference: str = "FedMoCo v3 (ViT, end-to-end)") -> str:
        row, ref = _find(rows, label, HEADLINE_GROUP), _find(rows, reference, HEADLINE_GROUP)
        if not row or not ref or not row.get(key) or not ref.get(key):
            return "not in this preset"
        return f"{ref[key] / row[key]:.2f}x"

    two = "2 classes per client"
    table = markdown_table(["paper's claim", "paper", "ours (this page)"], [
        ["MocoSFL-1, 100 clients, 2 classes each: linear probe", "87.71%", ours("MocoSFL-1 (cut 1)", f"{two}, 100 clients")],
        ["MocoSFL-1, 1,000 clients: linear probe", "86.46%", ours("MocoSFL-1 (cut 1)", f"{two}, 1,000 clients")],
        ["MocoSFL-3, 1,000 clients: linear probe", "84.75%", ours("MocoSFL-3 (cut 2)", f"{two}, 1,000 clients")],
        ["FL-BYOL, non-IID (5 / 20 clients): linear probe", "83.34% / 75.77%", ours("FedBYOL", f"{two}, 10 clients")],
        ["LW-FedSSL vs end-to-end: client memory", "3.34x less", ratio("LW-FedSSL", "memory")],
        ["LW-FedSSL vs end-to-end: communication", "5.07x less", ratio("LW-FedSSL", "comm")],
        ["Prog-FedSSL vs end-to-end: communication", "1.67x less (5.04 vs 8.40 GB)", ratio("Prog-FedSSL", "comm")],
        ["LW-FedSSL / end-to-end / Prog-FedSSL: accuracy (avg. of 4 downstream sets)", "58.35 / 60.79 / 63.48",
         " / ".join(ours(m, HEADLINE_GROUP, "knn") for m in ("LW-FedSSL", "FedMoCo v3 (ViT, end-to-end)",
                                                             "Prog-FedSSL")) + " (kNN)"],
        ["FedMAE vs other federated SSL", "better (no figure in the abstract)",
         " vs ".join(ours(m, HEADLINE_GROUP, "knn") for m in ("FedMAE (stage-wise)", "FedMoCo v3 (ViT, end-to-end)"))
         + " (kNN)"],
    ])
    return ("## The papers' headline numbers beside ours\n\n" + table +
            "\nWhy they differ: the papers train ResNet-18 / ViT-Tiny for hundreds of epochs on all 50,000 CIFAR-10 "
            "images (LW-FedSSL: on COCO, then four downstream sets) on GPUs; the cpu-small preset trains networks "
            "a fraction of that width for 4 epochs of a 5,085-image subset on 2 CPU cores, so every accuracy here is "
            "far below theirs and the gaps between methods are small against single-run noise. The cost ratios "
            "do not depend on the scale in the same way: they come from what a client holds and sends, measured on "
            "real steps (see benchmarks/results/layerwise_costs.md for the paper's own ViT-Tiny setting).\n")


def render_results_page(preset: ComparePreset, rows: Sequence[dict[str, Any]], *, when: str, machine: str,
                        command: str, plots: Sequence[str], reliability: str) -> str:
    folded = fold_seeds(rows)
    seeds = len(preset.seeds)
    intro = (f"# Results: every method on the same data, accuracy against client cost\n\n"
             f"Preset `{preset.name}`: {preset.description}. Measured {when} on {machine} by `{command}`.\n\n"
             "Every run is a full `fedssl run` of the in-process engine; its run directory holds the report. "
             "Accuracies are of the FINAL encoder, frozen: kNN (k 200, T 0.1) and a linear probe fitted on the train "
             "split and scored once on the test split; nothing is selected on the test split. Client peak memory "
             "and FLOPs per image are measured on a real client training step (MocoSFL: the client-net's step; "
             "the ceilings: the single machine's step); bytes are the mean per client over the run, from the real "
             "payloads; training time is the wall time of the rounds. "
             + (f"Mean ± spread (population std) over {seeds} seeds. " if seeds > 1 else "One seed per run. ")
             + "The ResNet methods and the ViT methods train different backbones: compare each with the ceiling "
             "of its own backbone.\n\n")
    figures = "".join(f"![{Path(p).stem}]({p})\n" for p in plots)
    return (intro + "## All runs\n\n" + results_table(folded, preset.finetune) +
            f"\n## Accuracy against client cost ({HEADLINE_GROUP})\n\n" + figures + "\n" + papers_section(folded) +
            "\n" + reliability)


__all__ = ["HEADLINE_GROUP", "fold_seeds", "pareto_front", "plot_tradeoff", "render_results_page", "results_table"]
