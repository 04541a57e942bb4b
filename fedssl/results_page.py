"""The results page (docs/RESULTS.md): every method of a comparison preset, accuracy against client cost.

Rows come from :func:`fedssl.compare.run_comparison` (each read off its run directory);
runs of the same method and setting with different seeds are folded into mean and spread.
The page holds one table, two plots (accuracy vs client memory, accuracy vs communication,
with the Pareto front), the seed papers' headline numbers beside ours, and the reliability
section (:mod:`fedssl.reliability`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedssl.compare import ComparePreset
from fedssl.io import atomic_savefig
from fedssl.report import markdown_table
from fedssl.resources import human_bytes, human_flops

ACCURACIES = ("knn", "probe", "finetune", "knn_init", "probe_init", "knn_pixels", "probe_pixels", "knn_gain")
COSTS = ("memory", "flops", "comm", "train_seconds", "optimizer_steps", "image_steps")
MIN_GAIN = 0.05  # a federated method should end >= 5 points above its random init in the headline setting
MIN_CEILING_GAIN = 0.10  # a centralized ceiling >= 10 points
MIN_LEARNED_GAIN = 0.02  # a kNN gain below 2 points (or below its seed spread) is not measurable learning


def fold_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, label): accuracies (and the kNN gain over random init, seed by seed) as mean and
    population std over seeds, costs as means, and the code versions the runs came from."""
    folded: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        folded.setdefault((row["group"], row["label"]), []).append(row)
    out = []
    for (group, label), runs in folded.items():
        row: dict[str, Any] = {"group": group, "label": label, "method": runs[0]["method"], "seeds": len(runs),
                               "arch": runs[0].get("arch"), "rounds": runs[0].get("rounds"),
                               "code_versions": sorted({r.get("code_version", "unrecorded") for r in runs})}
        runs = [{"knn_gain": r["knn"] - r["knn_init"] if r.get("knn_init") is not None else None, **r} for r in runs]
        for key in ACCURACIES:
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_spread"] = statistics.pstdev(values) if len(values) > 1 else None
        for key in COSTS:
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        out.append(row)
    return out


def _acc(row: dict[str, Any] | None, key: str) -> str:
    value = None if row is None else row.get(key)
    if value is None:
        return "—"
    spread = row.get(f"{key}_spread")
    return f"{100 * value:.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def _gain(row: dict[str, Any]) -> str:
    value, spread = row.get("knn_gain"), row.get("knn_gain_spread")
    if value is None:
        return "—"
    text = f"{100 * value:+.2f}" + (f" ± {100 * spread:.2f}" if spread is not None else "")
    return text + (" (did not learn)" if value <= 0 else "")


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def results_table(rows: Sequence[dict[str, Any]], finetune: bool) -> str:
    header = ["setting", "method", "seeds", "kNN: raw pixels", "kNN: random init", "kNN: trained",
              "trained - random init (points)", "probe: random init", "probe: trained",
              *(["fine-tune"] if finetune else []), "optimizer steps", "image-steps", "client peak memory",
              "client FLOPs/img", "bytes per client (run)", "training time"]
    body = [[r["group"], r["label"], str(r["seeds"]), _acc(r, "knn_pixels"), _acc(r, "knn_init"), _acc(r, "knn"),
             _gain(r), _acc(r, "probe_init"), _acc(r, "probe"), *([_acc(r, "finetune")] if finetune else []),
             _count(r.get("optimizer_steps")), _count(r.get("image_steps")),
             human_bytes(r["memory"]) if r["memory"] is not None else "—",
             human_flops(r["flops"]) if r["flops"] is not None else "—",
             human_bytes(r["comm"]) if r["comm"] else "— (pooled)", f"{r['train_seconds']:.0f} s"] for r in rows]
    return markdown_table(header, body)


def _ceiling_of(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The centralized ceiling (pooled data) that trains the same backbone as ``row``."""
    return next((r for r in rows if r["group"] == "pooled data" and r.get("arch") == row.get("arch")), None)


def measured_reason(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """Why a row misses its goal, read off the page's own runs: does its backbone learn at this budget at all
    (its ceiling's gain), or does the federation lose what the ceiling gains with the same passes?"""
    gain, spread = row.get("knn_gain"), row.get("knn_gain_spread") or 0.0
    noise = (f" Its gain is within its seed spread of zero ({_gain(row)})." if gain is not None and gain <= spread
             else "")
    if row["group"] == "pooled data":
        return (f"Measured: {_count(row.get('image_steps'))} image-steps ({row.get('rounds', '?')} passes over the "
                f"data) were not enough for this backbone to gain 10 points.{noise}")
    ceiling = _ceiling_of(row, rows)
    if ceiling is None or ceiling.get("knn_gain") is None:
        return f"No ceiling of the same backbone in this comparison to tell the budget from the federation.{noise}"
    steps = (f"; it took {_count(row.get('optimizer_steps'))} optimizer steps summed over clients against the "
             f"ceiling's {_count(ceiling.get('optimizer_steps'))}" if row.get("optimizer_steps") else "")
    if ceiling["knn_gain"] < MIN_CEILING_GAIN:
        return (f"Measured: the budget, not only the federation: with the same passes over the data its backbone's "
                f"centralized ceiling gained only {_gain(ceiling)} points{steps}.{noise}")
    return (f"Measured: the federation at this budget: with the same passes over the data its backbone's centralized "
            f"ceiling gained {_gain(ceiling)} points, this method {_gain(row)}{steps}.{noise}")


def goals_section(rows: Sequence[dict[str, Any]], headline: str, reasons: dict[str, str] | None = None) -> str:
    """Which rows clear the learning goals (ceilings >= 10 points over random init, federated methods >= 5 in the
    headline setting), and for those that do not, why: ``reasons`` where given, else :func:`measured_reason`."""
    reasons = reasons or {}
    lines = []
    for r in rows:
        if r["group"] == "pooled data":
            goal = MIN_CEILING_GAIN
        elif r["group"] == headline:
            goal = MIN_GAIN
        else:
            continue
        gain = r.get("knn_gain")
        met = gain is not None and gain >= goal
        verdict = "met" if met else "NOT met"
        why = "" if met else f" {reasons.get(r['label']) or measured_reason(r, rows)}"
        lines.append(f"- {r['label']} ({r['group']}): {_gain(r)} points over random init, goal "
                     f">= {100 * goal:.0f}: **{verdict}**.{why}")
    return ("## Does each method learn?\n\nThe goal: each centralized ceiling at least 10 kNN points above the random-"
            f"init encoder of its architecture, every federated method at least 5 points above in {headline}.\n\n"
            + "\n".join(lines) + "\n")


def versions_note(rows: Sequence[dict[str, Any]]) -> str:
    """The code versions the page's runs came from; a loud line where they differ."""
    versions = sorted({v for r in rows for v in r.get("code_versions", [r.get("code_version", "unrecorded")])})
    if len(versions) == 1:
        return f"Every run of this page was computed by the same code: `{versions[0]}`.\n"
    return ("**The runs of this page come from different code versions** (" + ", ".join(f"`{v}`" for v in versions)
            + "): a reused run was computed by other code than a new one; rerun into a fresh folder for one version.\n")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both (lower cost and higher accuracy), by cost."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def plot_tradeoff(rows: Sequence[dict[str, Any]], cost_key: str, xlabel: str, path: Path, title: str,
                  headline: str) -> Path:
    """kNN accuracy vs a client cost in MiB (log scale) for the ``headline`` group, the Pareto front drawn, each
    ceiling and its random init as lines; written atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["group"] == headline and r.get(cost_key) and r.get("knn") is not None]
    ceilings = [r for r in rows if r["group"] == "pooled data" and r.get("knn") is not None]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    mib = [(r[cost_key] / 2**20, 100 * r["knn"]) for r in shown]
    markers = "osD^v<>PXh*"  # colour and marker together tell the methods apart in the legend
    for i, (r, (x, y)) in enumerate(zip(shown, mib)):
        points = ax.scatter(x, y, s=40, marker=markers[i % len(markers)], label=f"{r['label']}: {y:.1f}%")
        if r.get("knn_init") is not None:  # its random init (same architecture): a hollow marker below it
            init = 100 * r["knn_init"]
            ax.plot([x, x], [init, y], color=points.get_facecolor()[0], alpha=0.35, linewidth=1)
            ax.scatter(x, init, s=40, marker=markers[i % len(markers)], facecolors="none",
                       edgecolors=points.get_facecolor()[0], alpha=0.6)
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
    ax.set_ylabel("kNN accuracy (%): trained (filled), random init (hollow)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def _find(rows: Sequence[dict[str, Any]], label: str, group: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["label"] == label and r["group"] == group), None)


@dataclass(frozen=True)
class Claim:
    """A paper's claim, tested on the page's rows: ``a`` compared with ``b`` (``key``: an accuracy or a cost).

    Accuracy claims: holds when mean(a) - mean(b) >= ``-margin`` (``margin`` 0: a at least b). Cost claims
    (``ratio``): holds when mean(b) / mean(a) >= ``margin`` (a is that many times cheaper).
    """

    text: str
    paper: str
    a: tuple[str, str]  # (label, group)
    b: tuple[str, str]
    key: str = "knn"
    margin: float = 0.0
    ratio: bool = False


def learned_measurably(gain: float | None, spread: float = 0.0) -> bool:
    """The project's rule: a kNN gain over random init is learning only where it clears ``MIN_LEARNED_GAIN`` and
    its own seed spread (one seed: no spread)."""
    return gain is not None and gain > max(MIN_LEARNED_GAIN, spread)


def _learned(row: dict[str, Any]) -> bool:
    """Whether a row learned at all measurably (``learned_measurably`` of its kNN gain and spread)."""
    return learned_measurably(row.get("knn_gain"), row.get("knn_gain_spread") or 0.0)


def claim_verdict(claim: Claim, rows: Sequence[dict[str, Any]]) -> tuple[str, str, str]:
    """(ours, verdict, why) for one claim: "holds" / "does not hold" / "cannot be tested here"."""
    a, b = _find(rows, *claim.a), _find(rows, *claim.b)
    if a is None or b is None or a.get(claim.key) is None or b.get(claim.key) is None:
        missing = claim.a[0] if a is None or a.get(claim.key) is None else claim.b[0]
        return "—", "cannot be tested here", f"{missing} is not in this preset's {claim.a[1] if a is None else claim.b[1]}"
    if claim.ratio:
        value = b[claim.key] / a[claim.key]
        verdict = "holds" if value >= claim.margin else "does not hold"
        return f"{value:.2f}x", verdict, f"measured on real client steps / payloads (needs >= {claim.margin:g}x)"
    if not (_learned(a) and _learned(b)):
        flat = [r["label"] for r in (a, b) if not _learned(r)]
        return (f"{_acc(a, claim.key)} vs {_acc(b, claim.key)}", "cannot be tested here",
                f"{' and '.join(flat)} did not learn measurably at this scale (kNN gain over random init "
                f"{', '.join(_gain(r) for r in (a, b) if not _learned(r))} points)")
    diff = a[claim.key] - b[claim.key]
    spreads = [x for x in (a.get(f"{claim.key}_spread"), b.get(f"{claim.key}_spread")) if x is not None]
    spread = math.sqrt(sum(x * x for x in spreads)) if spreads else None
    verdict = "holds" if diff >= -claim.margin else "does not hold"
    seeds = min(a["seeds"], b["seeds"])
    why = f"difference {100 * diff:+.2f} points ({seeds} seed{'s' if seeds > 1 else ''})"
    if spread is not None and abs(diff + claim.margin) <= spread:
        why += f", within the seeds' spread (±{100 * spread:.2f}): the verdict could flip with other seeds"
    elif spread is None:
        why += "; one seed: no spread to judge it by"
    return f"{_acc(a, claim.key)} vs {_acc(b, claim.key)}", verdict, why


def paper_claims(headline: str) -> list[Claim]:
    """The seed papers' claims this page tests (MocoSFL, LW-FedSSL / Prog-FedSSL, FedMAE)."""
    iid, two, many = "IID, 100 clients", "2 classes per client, 100 clients", "2 classes per client, 1,000 clients"
    e2e = "FedMoCo v3 (ViT, end-to-end)"
    return [
        Claim("MocoSFL non-IID within ~1 point of IID (100 clients)", "87.71 vs 87.29 (cut 1, probe)",
              ("MocoSFL-1 (cut 1)", two), ("MocoSFL-1 (cut 1)", iid), margin=0.01),
        Claim("MocoSFL above FedMoCo under non-IID (100 clients, 2 classes each)",
              "87.71 vs FL-BYOL 83.34 (5 clients) / 75.77 (20)",
              ("MocoSFL-1 (cut 1)", two), ("FedMoCo v2", two)),
        Claim("MocoSFL above FedMoCo under non-IID (Dirichlet 0.5, 10 clients)", "(not in the paper's grid)",
              ("MocoSFL-1 (cut 1)", headline), ("FedMoCo v2", headline)),
        Claim("FedMoCo degrades from IID to non-IID (100 clients): IID above non-IID", "FL-SSL baselines lose accuracy under non-IID",
              ("FedMoCo v2", iid), ("FedMoCo v2", two)),
        Claim("MocoSFL keeps its accuracy at 1,000 clients (within ~1.5 points of 100)", "86.46 vs 87.71 (cut 1, probe)",
              ("MocoSFL-1 (cut 1)", many), ("MocoSFL-1 (cut 1)", two), margin=0.015),
        Claim("LW-FedSSL within ~2.5 points of end-to-end", "83.43 vs 83.95 (CIFAR-10, linear)",
              ("LW-FedSSL", headline), (e2e, headline), margin=0.025),
        Claim("LW-FedSSL needs >= 3x less client memory than end-to-end", "3.3x less",
              ("LW-FedSSL", headline), (e2e, headline), key="memory", margin=3.0, ratio=True),
        Claim("LW-FedSSL sends >= 3x less than end-to-end", "3.2x less",
              ("LW-FedSSL", headline), (e2e, headline), key="comm", margin=3.0, ratio=True),
        Claim("Prog-FedSSL at least as accurate as end-to-end", "86.53 vs 83.95 (CIFAR-10, linear)",
              ("Prog-FedSSL", headline), (e2e, headline)),
        Claim("Prog-FedSSL sends >= 1.8x less than end-to-end", "1.8x less",
              ("Prog-FedSSL", headline), (e2e, headline), key="comm", margin=1.8, ratio=True),
        Claim("FedMAE at least as accurate as end-to-end federated MAE", "better (no figure in the abstract)",
              ("FedMAE (stage-wise)", headline), ("federated MAE (end-to-end)", headline)),
        Claim("FedMAE needs less client memory than end-to-end federated MAE", "lower cost",
              ("FedMAE (stage-wise)", headline), ("federated MAE (end-to-end)", headline), key="memory",
              margin=1.0, ratio=True),
    ]


def claims_section(rows: Sequence[dict[str, Any]], headline: str) -> str:
    """The papers' claims, each with ours (mean ± std over seeds) and a verdict with its measured reason."""
    body = []
    for claim in paper_claims(headline):
        ours, verdict, why = claim_verdict(claim, rows)
        body.append([claim.text, claim.paper, ours, f"**{verdict}**", why])
    return ("## The papers' claims, each with a verdict\n\n"
            "Ours: kNN of the final encoder (mean ± std over seeds where there are several), or a measured cost "
            "ratio. An accuracy claim *cannot be tested here* when a method it compares did not learn measurably "
            "(kNN gain over random init below 2 points or its spread): a difference between two untrained encoders "
            "says nothing about the methods. The papers train ResNet-18 / ViT-Tiny for hundreds of epochs on all "
            "50,000 CIFAR-10 images on GPUs (LW-FedSSL on COCO); these rows train narrow nets for a few epochs of "
            "a 5,085-image subset on 2 CPU cores, so our accuracies are far below theirs.\n\n"
            + markdown_table(["claim", "paper", "ours", "verdict", "why"], body))


def pending_note(finished: int, pending: Sequence[str]) -> str:
    """A partial page's first words: how many settings finished and which are still to run."""
    if not pending:
        return ""
    shown = ", ".join(f"`{k}`" for k in pending[:12]) + (f" and {len(pending) - 12} more" if len(pending) > 12 else "")
    return (f"**Partial page: {finished} of {finished + len(pending)} settings have finished.** Still to run: {shown}. "
            "Every table, goal and claim below reads the finished runs only; a claim whose runs are missing says "
            "it cannot be tested. The same command without `--page-only` continues the comparison.\n\n")


def render_results_page(preset: ComparePreset, rows: Sequence[dict[str, Any]], *, when: str, machine: str,
                        command: str, plots: Sequence[str], reliability: str,
                        reasons: dict[str, str] | None = None, pending: Sequence[str] = (), wall: str = "") -> str:
    """The whole page; ``pending``: the settings of the preset not finished yet (a partial page says so first);
    ``wall``: a sentence on how long the command took."""
    folded = fold_seeds(rows)
    intro = (f"# Results: every method on the same data, accuracy against client cost\n\n"
             f"Preset `{preset.name}`: {preset.description}. Measured {when} on {machine} by `{command}`. {wall}"
             + versions_note(folded) + "\n" + pending_note(len(rows), pending) +
             "Every run is a full `fedssl run` of the in-process engine; its run directory holds the report. "
             "Accuracies are of the FINAL encoder, frozen: kNN (cosine, k 200, T 0.1) and a linear probe fitted on "
             "the train split and scored once on the test split; nothing is selected on the test split. Each stands "
             "beside the random-init encoder of the same architecture and raw pixels (same protocol); the gain is "
             "trained minus random init, seed by seed. Optimizer steps are summed over clients (local steps), "
             "image-steps count every image of every step. Client peak memory and FLOPs per image are measured on a "
             "real client training step (MocoSFL: the client-net's step; the ceilings: the single machine's step); "
             "bytes are the mean per client over the run, from the real payloads; training time is the wall time "
             "of the rounds. Where a row has several seeds: mean ± population std. The ResNet methods and the ViT "
             "methods train different backbones: compare each with the ceiling of its own backbone.\n\n")
    figures = "".join(f"![{Path(p).stem}]({p})\n" for p in plots)
    return (intro + "## All runs\n\n" + results_table(folded, preset.finetune) + "\n"
            + goals_section(folded, preset.headline, reasons) + "\n" + claims_section(folded, preset.headline)
            + f"\n## Accuracy against client cost ({preset.headline})\n\n" + figures + "\n" + reliability)


__all__ = ["Claim", "claim_verdict", "claims_section", "fold_seeds", "goals_section", "pareto_front", "plot_tradeoff",
           "measured_reason", "pending_note", "render_results_page", "results_table", "versions_note"]
