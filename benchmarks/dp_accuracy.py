"""What client-level DP costs in accuracy: FedMoCo's kNN against epsilon, no noise and two noise multipliers.

    OMP_NUM_THREADS=1 python benchmarks/dp_accuracy.py --threads 1          # ~20 min on one free core (9 runs)
    OMP_NUM_THREADS=1 python benchmarks/dp_accuracy.py --quick --threads 1  # a few minutes: proves it works

Every setting is a real ``fedssl.engines.local.start_run`` on the real CIFAR-10 subset (``--data-dir``,
default ../shared/data) from the demo preset's model and SSL settings (``configs/cifar10/demo.toml``: ResNet-10
width 16, GroupNorm) with ``method = fedmoco`` and a smaller budget (``RECIPE``): 20 Dirichlet-0.5 clients, 10
sampled per round, 5 rounds of one local epoch. Only ``privacy.noise_multiplier`` and ``seed`` change between
runs; every run clips (``privacy.clip_norm``), so the no-noise row is the same pipeline without noise
(epsilon infinite). The table gives the FINAL encoder's kNN (test split, mean +- std over the seeds) beside the
random-init encoder and raw pixels of the same seeds, epsilon at ``privacy.delta`` after the run (the same for
every seed), and the share of client updates the clip bound scaled down. Written to
benchmarks/results/dp_accuracy.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.config import load_toml, make_config  # noqa: E402
from fedssl.engines.local import start_run  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.privacy.dp import clients_per_round  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "cifar10" / "demo.toml"
# ~125 s of one core per run when the machine is free: 5 rounds x 10 clients x ~254 images (~85 s at ~150
# image-steps/s, measured per client on this machine) + three kNN passes over 6,102 images (~40 s)
RECIPE = ["method=fedmoco", "clients=20", "sample_fraction=0.5", "rounds=5", "local_epochs=1", "eval.probe=false",
          "eval.every=0", "privacy.enabled=true", "privacy.clip_norm=0.5", "privacy.delta=1e-5",
          "privacy.reproducible_noise=true"]
QUICK = ["clients=4", "rounds=2", "local_steps=1", "batch_size=16", "model.width=8", "eval.knn_k=20"]
NOISE = (0.0, 0.02, 1.0)  # 0: clipping only; 0.02: noise about the size of 5 rounds of clipped updates; 1.0: eps ~27
SEEDS = (0, 1, 2)


def run_one(noise: float, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """One real run; its final kNN, its baselines, epsilon and the share of clipped updates."""
    extra = [f"data_dir={args.data_dir}", f"threads={args.threads}", "download=false", *RECIPE,
             *(QUICK if args.quick else []), *args.set, f"privacy.noise_multiplier={noise}", f"seed={seed}"]
    cfg = make_config(load_toml(PRESET), extra)
    start = time.perf_counter()
    out = start_run(cfg, runs / f"z{noise:g}-seed{seed}")
    m = clients_per_round(cfg.sample_fraction, cfg.clients)
    updates = cfg.rounds * m
    floats = out.metrics[0]["bytes_up"] / (out.metrics[0]["clients"] * 4)  # float32 values a client uploads
    return {"noise_to_bound": noise * math.sqrt(floats) / m,"noise": noise, "seed": seed, "knn": out.final["knn_acc"], "init": out.initial["knn_acc"],
            "pixels": out.initial["pixels"]["knn_acc"], "epsilon": out.metrics[-1]["epsilon"],
            "clipped": sum(m["clipped"] for m in out.metrics) / updates, "seconds": time.perf_counter() - start,
            "cfg": cfg}


def spread(values: list[float]) -> str:
    """mean +- std (sample std over the seeds) in percent."""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def eps_text(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: raw pixels, random init, then one row per noise multiplier."""
    seeds = sorted({r["seed"] for r in rows})
    first = [next(r for r in rows if r["seed"] == s) for s in seeds]  # the baselines are per seed, not per noise
    lines = ["| setting | noise multiplier z | epsilon | noise norm / clip bound | kNN (%) | "
             "trained - random init (points) | clipped updates | wall per run |", "|---|---|---|---|---|---|---|---|",
             f"| raw pixels | — | — | — | {spread([r['pixels'] for r in first])} | — | — | — |",
             f"| random init | — | — | — | {spread([r['init'] for r in first])} | — | — | — |"]
    for noise in sorted({r["noise"] for r in rows}):
        group = [r for r in rows if r["noise"] == noise]
        gains = [r["knn"] - r["init"] for r in group]
        name = "FedMoCo + DP, clipping only" if noise == 0 else "FedMoCo + DP"
        lines.append(f"| {name} | {noise:g} | {eps_text(group[0]['epsilon'])} | {group[0]['noise_to_bound']:.2g} | "
                     f"{spread([r['knn'] for r in group])} | {spread(gains)} | "
                     f"{100 * statistics.fmean(r['clipped'] for r in group):.0f}% | "
                     f"{statistics.fmean(r['seconds'] for r in group):.0f} s |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    from fedssl.bench import machine_description

    cfg = rows[0]["cfg"]
    m = clients_per_round(cfg.sample_fraction, cfg.clients)
    head = ("# Client-level DP: kNN against epsilon on the real CIFAR-10 subset\n\n"
            f"Measured {datetime.date.today().isoformat()} on {machine_description()} by `{command}`.\n\n"
            f"FedMoCo, {cfg.clients} clients (partition {cfg.partition}, alpha {cfg.alpha}), {m} sampled per round, "
            f"{cfg.rounds} rounds, backbone {cfg.model.arch} width {cfg.model.width}; every run clips each client's "
            f"update to L2 norm {cfg.privacy.clip_norm:g} and adds noise of std z x {cfg.privacy.clip_norm:g} to "
            f"the sum of the {m} updates (DP-FedAvg, README \"Privacy\"). Epsilon at delta = {cfg.privacy.delta:g} "
            "from dp-accounting (RDP, sampling without replacement, replace-one adjacency). FINAL encoders, kNN "
            f"(k = {cfg.eval.knn_k}) on frozen features of the test split; mean ± std over seeds {sorted({r['seed'] for r in rows})} "
            "(the random-init and raw-pixel rows are each seed's untrained encoder and pixels).\n\n")
    note = ("\nNoise norm / clip bound: the norm of one round's noise on the AVERAGE (z x clip x sqrt(values "
            f"uploaded) / {m}) over the largest norm the average of the clipped updates can have (the clip bound); "
            "clipped updates: the share of the client updates the bound scaled down. Where that ratio is large, the "
            "final weights are mostly noise (a differently scaled random network), so a kNN above random init there "
            "is not evidence of learning. Wall times are of this machine as it was during the runs (others may share "
            "it).\n")
    if args.quick:
        head = "**A smoke run (`--quick`): a tiny budget that proves the script works, not a measurement.**\n\n" + head
    return head + table(rows) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny budget that proves it works")
    parser.add_argument("--noise", nargs="*", type=float, default=list(NOISE), help="noise multipliers to run")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dp_accuracy.md"))
    parser.add_argument("--runs", help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    command = "python benchmarks/dp_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        rows = []
        for seed in args.seeds:
            for noise in args.noise:
                rows.append(run_one(noise, seed, args, runs))
                print(f"z {noise:g} seed {seed}: kNN {100 * rows[-1]['knn']:.2f}%, epsilon "
                      f"{eps_text(rows[-1]['epsilon'])}, {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    text = render(rows, args, command.strip())
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
