"""Accuracy vs client cost: end-to-end FedMoCo v3, LW-FedSSL (plain, + calibration, + alignment, full), Prog-FedSSL.

    OMP_NUM_THREADS=1 python benchmarks/layerwise_accuracy.py --threads 1     # ~21 min on one busy core (8 rounds)
    OMP_NUM_THREADS=2 python benchmarks/layerwise_accuracy.py --set rounds=12 layerwise.rounds_per_stage=3  # the preset's 12
    OMP_NUM_THREADS=1 python benchmarks/layerwise_accuracy.py --quick --threads 1   # < 3 min: proves it works

Every setting is a real run of the in-process engine on the real CIFAR-10 subset
(``--data-dir``, default ../shared/data) from the preset ``configs/cifar10/lw-fedssl.toml``
(same ViT, clients, partition, rounds, local budget and seed for all), changing only the
method and the calibration / alignment switches. The table gives the FINAL encoder's kNN and
linear-probe accuracy beside raw pixels and the random-init encoder of the same architecture (and
the difference), the client's measured peak training memory and its bytes over the run, and the
ablation deltas against plain LW-FedSSL where both learned measurably; then the verdicts, judged
only where both sides learned (benchmarks/floors.py). Run directories are kept under ``--runs``
and resumed if the script is killed. Written to benchmarks/results/layerwise_accuracy.md (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.floors import (FLOOR_NOTE, NOISE_NOTE, comparison_line, floor_cells, floor_header,  # noqa: E402
                               learned, learning_line, measured_line, points)
from fedssl.compare import Setting, run_comparison  # noqa: E402
from fedssl.config import load_toml  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402
from fedssl.resources import human_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = load_toml(REPO / "configs" / "cifar10" / "lw-fedssl.toml")
FULL = load_toml(REPO / "configs" / "cifar10" / "lw-fedssl-full.toml")
CALIBRATION = tuple(f"calibration.{k}={v!r}".replace("'", '"') for k, v in FULL["calibration"].items())
ALIGNMENT = tuple(f"alignment.{k}={v!r}".replace("'", '"') for k, v in FULL["alignment"].items())

PLAIN, END_TO_END, PROG = "LW-FedSSL (plain)", "FedMoCo v3 (end-to-end)", "Prog-FedSSL"
# key (run folder), label, overrides on top of the preset
SETTINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fedmocov3", END_TO_END, ("method=fedmocov3",)),
    ("lw-plain", PLAIN, ("method=lw-fedssl",)),
    ("lw-calibration", "LW-FedSSL + calibration", ("method=lw-fedssl", *CALIBRATION)),
    ("lw-alignment", "LW-FedSSL + alignment", ("method=lw-fedssl", *ALIGNMENT)),
    ("lw-full", "LW-FedSSL full (calibration + alignment)", ("method=lw-fedssl", *CALIBRATION, *ALIGNMENT)),
    ("prog-fedssl", PROG, ("method=prog-fedssl",)),
)
# an end-to-end round of the preset's ViT over the 5,085 images takes ~30 s on 2 free cores (~45 s on one busy
# core), LW rounds about a third of that; the cpu comparison's ViT budget: 8 rounds, 2 per block
BUDGET = ("rounds=8", "layerwise.rounds_per_stage=2")
QUICK = ("clients=4", "rounds=4", "layerwise.rounds_per_stage=1", "local_steps=2", "batch_size=32",
         "eval.probe_epochs=3", "eval.every=0", "calibration.steps=2")


def settings(args: argparse.Namespace) -> list[Setting]:
    chosen = [s for s in SETTINGS if not args.only or any(w.lower() in s[1].lower() for w in args.only)]
    if not any(label == PLAIN for _, label, _ in chosen):
        chosen.insert(0, SETTINGS[1])  # the ablation's reference
    common = (f"data_dir={args.data_dir}", f"threads={args.threads}", "download=false",
              *(QUICK if args.quick else BUDGET), *args.set)
    return [Setting(key, label, PRESET, (*overrides, *common)) for key, label, overrides in chosen]


def _switches(setting: Setting) -> dict[str, bool]:
    cfg = setting.config()
    return {"calibration": cfg.calibration.aux_fraction > 0, "alignment": cfg.alignment.weight > 0}


def ablation_delta(row: dict[str, Any], plain: dict[str, Any], score: str) -> str:
    """The ablation against plain LW-FedSSL, only where both learned measurably (else it compares noise)."""
    if row is plain:
        return "ref."
    if not (learned(row) and learned(plain)):
        return "— (not learned)"
    return points(row[score] - plain[score])


def table(rows: list[dict[str, Any]]) -> str:
    plain = next(r for r in rows if r["label"] == PLAIN)
    return markdown_table(
        ["setting", "calibration", "alignment", *floor_header(), "Δ kNN vs plain", "Δ probe vs plain",
         "client peak memory", "comm per client", "training time"],
        [[r["label"], "on" if r["calibration"] else "off", "on" if r["alignment"] else "off", *floor_cells(r),
          ablation_delta(r, plain, "knn"), ablation_delta(r, plain, "probe"), human_bytes(r["memory"]),
          human_bytes(r["comm"]), f"{r['train_seconds']:.0f} s"] for r in rows])


def verdicts(rows: list[dict[str, Any]]) -> str:
    """Did each run learn; the papers' accuracy claims and each ablation, judged only where both sides learned."""
    by = {r["label"]: (r["label"], r) for r in rows}
    lines = [learning_line(label, row) for label, row in by.values()]
    if END_TO_END in by:
        if PLAIN in by:
            lines.append(comparison_line("LW-FedSSL within 2.5 points of end-to-end", by[PLAIN], by[END_TO_END],
                                         margin=0.025))
        if PROG in by:
            lines.append(comparison_line("Prog-FedSSL at least as accurate as end-to-end", by[PROG], by[END_TO_END]))
    for label in by:
        if label.startswith("LW-FedSSL ") and label != PLAIN:
            lines.append(comparison_line(f"{label} at least as accurate as plain", by[label], by[PLAIN]))
    return "## Verdicts (kNN, computed from the table)\n\n" + "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    budget = " ".join((*(QUICK if args.quick else BUDGET), *args.set))
    return ("# LW-FedSSL / Prog-FedSSL vs end-to-end on the real CIFAR-10 subset\n\n"
            f"{measured_line('layerwise_accuracy.py', argv)}\n\n"
            f"Preset `configs/cifar10/lw-fedssl.toml` (ViT width 64, 4 blocks, patch 4; 10 Dirichlet(0.5) clients; "
            f"seed 0) with {budget}: {rows[0]['rounds']} rounds (the budget of the cpu comparison's ViT methods); "
            "FINAL encoders, kNN and linear probe on frozen features. Memory: measured peak of one real client step "
            "(staged methods: the larger of the first and last stage); comm: bytes up + down per client over the "
            "run (mean over clients), from the real payloads. The Δ columns are the ablation against plain "
            "LW-FedSSL in accuracy points, shown only where both it and plain LW-FedSSL learned measurably.\n\n"
            + FLOOR_NOTE + "\n\n" + table(rows) + "\n" + verdicts(rows) + "\n" + NOISE_NOTE
            + " No ceiling runs here: whether this ViT learns at all at this budget when trained centrally is the cpu "
            "comparison's ViT ceiling row (docs/RESULTS.md). Calibration trains the whole current model on the "
            "server, so the frozen blocks change each round and every client downloads them again: its "
            f"communication is counted. Run directories (reports): `{args.runs}`.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny budget (< 3 min on 1 core) that proves it works")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every setting, e.g. --set rounds=8 layerwise.rounds_per_stage=2")
    parser.add_argument("--only", nargs="*", help="run only the settings whose name contains one of these words")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layerwise_accuracy.md"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "layerwise_accuracy"), help="run directories (resumed)")
    args = parser.parse_args(argv)
    chosen = settings(args)

    def progress(index: int, setting: Setting) -> None:
        print(f"[{index + 1}/{len(chosen)}] {setting.label} ...", file=sys.stderr, flush=True)

    rows = run_comparison(chosen, Path(args.runs), progress)
    for row, setting in zip(rows, chosen):
        row.update(_switches(setting))
    text = render(rows, args, sys.argv[1:] if argv is None else list(argv))
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
