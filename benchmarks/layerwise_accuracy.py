"""Accuracy vs client cost: end-to-end FedMoCo v3, LW-FedSSL (plain, + calibration, + alignment, full), Prog-FedSSL.

    OMP_NUM_THREADS=2 python benchmarks/layerwise_accuracy.py                 # ~15 min on 2 free cores (8 rounds)
    OMP_NUM_THREADS=2 python benchmarks/layerwise_accuracy.py --set rounds=12 layerwise.rounds_per_stage=3  # the preset's 12
    OMP_NUM_THREADS=1 python benchmarks/layerwise_accuracy.py --quick --threads 1   # < 3 min: proves it works

Every setting is a real ``fedssl.engines.local.start_run`` on the real CIFAR-10 subset
(``--data-dir``, default ../shared/data) from the preset ``configs/cifar10/lw-fedssl.toml``
(same ViT, clients, partition, rounds, local budget and seed for all), changing only the
method and the calibration / alignment switches. The table gives the FINAL encoder's kNN and
linear-probe accuracy beside the client's measured peak training memory and its bytes over the
run, and the ablation deltas against plain LW-FedSSL, whatever their sign. Written to
benchmarks/results/layerwise_accuracy.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.config import load_toml, make_config  # noqa: E402
from fedssl.engines.local import start_run  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.resources import human_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "cifar10" / "lw-fedssl.toml"
FULL = load_toml(REPO / "configs" / "cifar10" / "lw-fedssl-full.toml")
CALIBRATION = [f"calibration.{k}={v!r}".replace("'", '"') for k, v in FULL["calibration"].items()]
ALIGNMENT = [f"alignment.{k}={v!r}".replace("'", '"') for k, v in FULL["alignment"].items()]

SETTINGS: list[tuple[str, list[str]]] = [
    ("FedMoCo v3 (end-to-end)", ["method=fedmocov3"]),
    ("LW-FedSSL (plain)", ["method=lw-fedssl"]),
    ("LW-FedSSL + calibration", ["method=lw-fedssl", *CALIBRATION]),
    ("LW-FedSSL + alignment", ["method=lw-fedssl", *ALIGNMENT]),
    ("LW-FedSSL full (calibration + alignment)", ["method=lw-fedssl", *CALIBRATION, *ALIGNMENT]),
    ("Prog-FedSSL", ["method=prog-fedssl"]),
]
# ~15 min on 2 free cores: an end-to-end round of the preset's ViT over the 5,085 images takes ~30 s there
# (44 s on one shared core), LW rounds about a third of that; 12 rounds would take ~18 min.
BUDGET = ["rounds=8", "layerwise.rounds_per_stage=2"]
QUICK = ["clients=4", "rounds=4", "layerwise.rounds_per_stage=1", "local_steps=2", "batch_size=32",
         "eval.probe_epochs=3", "eval.every=0", "calibration.steps=2"]


def run_setting(index: int, name: str, overrides: list[str], args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    extra = [f"data_dir={args.data_dir}", f"threads={args.threads}", "download=false", *(QUICK if args.quick else BUDGET),
             *args.set]
    cfg = make_config(load_toml(PRESET), [*overrides, *extra])
    start = time.perf_counter()
    out = start_run(cfg, runs / f"{index}-{cfg.method}")
    summary = out.ledger.summary()
    return {"name": name, "method": cfg.method, "knn": out.final["knn_acc"], "probe": out.final.get("probe_acc"),
            "knn_init": out.initial["knn_acc"], "probe_init": out.initial.get("probe_acc"),
            "memory": summary.get("peak_training_bytes_max", 0.0), "comm": summary["comm_bytes_mean"],
            "calibration": cfg.calibration.aux_fraction > 0, "alignment": cfg.alignment.weight > 0,
            "seconds": time.perf_counter() - start, "rounds": cfg.rounds}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def delta(v: float | None, base: float | None) -> str:
    return "-" if v is None or base is None else f"{100 * (v - base):+.2f}"


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    plain = next(r for r in rows if r["name"] == "LW-FedSSL (plain)")
    from fedssl.bench import machine_description

    head = ("# LW-FedSSL / Prog-FedSSL vs end-to-end on the real CIFAR-10 subset\n\n"
            f"Measured {datetime.date.today().isoformat()} on {machine_description()} by `python "
            f"benchmarks/layerwise_accuracy.py --data-dir {args.data_dir}"
            f"{' --quick' if args.quick else ''}{' --set ' + ' '.join(args.set) if args.set else ''}`.\n\n"
            f"Preset `configs/cifar10/lw-fedssl.toml` with {' '.join((QUICK if args.quick else BUDGET) + args.set)}; "
            f"{rows[0]['rounds']} rounds; FINAL encoders, kNN and linear probe on frozen features. "
            "Memory: measured peak of one real client step (staged methods: the larger of the first and last stage); comm: bytes up + down "
            "per client over the run (mean over clients), from the real payloads. The Δ columns are the "
            "ablation against plain LW-FedSSL in accuracy points, whatever their sign.\n\n")
    lines = ["| setting | calibration | alignment | kNN: random init | kNN | trained - random init | Δ kNN | "
             "probe: random init | probe | Δ probe | client peak memory | comm per client | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'on' if r['calibration'] else 'off'} | {'on' if r['alignment'] else 'off'} | "
                     f"{pct(r['knn_init'])} | {pct(r['knn'])} | {delta(r['knn'], r['knn_init'])} | "
                     f"{delta(r['knn'], plain['knn'])} | {pct(r['probe_init'])} | {pct(r['probe'])} | "
                     f"{delta(r['probe'], plain['probe'])} | {human_bytes(r['memory'])} | {human_bytes(r['comm'])} | "
                     f"{r['seconds']:.0f} s |")
    note = ("\n\nWall times are of this machine as it was during the run (other jobs may share it): they are not "
            "a speed comparison (the measured per-client costs are). One seed, one short run per setting: differences "
            "of a point or two are within the noise of "
            "a single run. Calibration trains the whole current model on the server, so the frozen blocks "
            "change each round and every client downloads them again: its communication is counted.\n")
    return head + "\n".join(lines) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny budget (< 3 min on 1 core) that proves it works")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every setting, e.g. --set rounds=8 layerwise.rounds_per_stage=2")
    parser.add_argument("--only", nargs="*", help="run only the settings whose name contains one of these words")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layerwise_accuracy.md"))
    parser.add_argument("--runs", help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    settings = [s for s in SETTINGS if not args.only or any(w.lower() in s[0].lower() for w in args.only)]
    if not any(name == "LW-FedSSL (plain)" for name, _ in settings):
        settings.insert(0, SETTINGS[1])  # the ablation's reference
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        rows = []
        for index, (name, overrides) in enumerate(settings):
            rows.append(run_setting(index, name, overrides, args, runs))
            print(f"{name}: kNN {pct(rows[-1]['knn'])}, probe {pct(rows[-1]['probe'])}, "
                  f"{rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    text = render(rows, args)
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
