"""What a split server can see: the inversion attack (``fedssl attack``) on a MocoSFL run of the real CIFAR-10 subset.

    python benchmarks/inversion.py --data-dir ../shared/data            # pre-train the preset, then attack it
    python benchmarks/inversion.py --run runs/inversion/mocosfl          # attack a finished split run

Without ``--run`` it first runs ``--preset`` (default configs/cifar10/demo.toml, the run of ``make demo``: MocoSFL,
10 Dirichlet-0.5 clients, ResNet-10 width 16, cut 1, 15 rounds, about 4.5 minutes on 2 idle cores; ``--rounds``
shortens it) into ``--runs``/<preset name>, or reuses that folder where a finished run is already there.
Then, for each cut, the server trains a decoder on its own images (the first half of the test split) and
decodes 64 of the clients' training images (``fedssl.privacy.inversion``). The table (cut, the client's
measured peak training memory, PSNR / SSIM of the trained and of the random-init encoder) is printed and
written to benchmarks/results/inversion.md with the picture (benchmarks/results/inversion.png), the date,
the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedssl.config import InversionConfig, load_toml, make_config
from fedssl.engines.local import resume_run, start_run
from fedssl.io import atomic_write_bytes, atomic_write_text
from fedssl.privacy.inversion import FIGURE_FILE, attack_run
from fedssl.report import markdown_table
from fedssl.resources import human_bytes
from fedssl.run_dir import open_run_dir

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "cifar10" / "demo.toml"  # make demo's MocoSFL: ResNet-10, whose cut 3 downsamples
RESULTS = REPO / "benchmarks" / "results"


def pretrain(preset: Path, data_dir: str, runs: Path, rounds: int, console: Console) -> Path:
    """The split preset on the real data (or the finished run already in ``runs``/<preset name>)."""
    path = runs / preset.stem
    if (path / "final.json").is_file():
        console.print(f"reusing the finished run {path}")
        return path
    overrides = [f"data_dir={data_dir}", "download=false"] + ([f"rounds={rounds}"] if rounds else [])
    cfg = make_config(load_toml(preset), overrides)
    console.print(f"pre-training {preset} ({cfg.rounds} rounds) -> {path}")
    start = time.perf_counter()
    if (path / "config.toml").is_file():
        resume_run(path)
    else:
        start_run(cfg, path)
    console.print(f"pre-trained in {time.perf_counter() - start:.0f} s")
    return path


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [[str(r["cut"]) + (" (the run's)" if r["cut"] == result["run_cut"] else ""),
             human_bytes(r["client_peak_training_bytes"]), "x".join(map(str, r["activation_shape"])),
             f"{r['trained']['psnr']:.2f} dB", f"{r['trained']['ssim']:.3f}",
             f"{r['random_init']['psnr']:.2f} dB", f"{r['random_init']['ssim']:.3f}"] for r in result["rows"]]


HEADER = ["cut", "client peak training memory", "activation sent", "PSNR, trained", "SSIM, trained",
          "PSNR, random init", "SSIM, random init"]


def describe_run(run: Path) -> str:
    """The attacked run in one sentence, from its own config.toml and final.json."""
    _, cfg = open_run_dir(run)
    final = json.loads((run / "final.json").read_text())
    knn = final["final"].get("knn_acc")
    return (f"{cfg.method}, {cfg.clients} clients ({cfg.partition}, alpha {cfg.alpha}), ResNet blocks "
            f"{list(cfg.model.blocks_per_stage)} width {cfg.model.width}, {cfg.rounds} rounds, cut {cfg.split.cut}, "
            f"seed {cfg.seed}" + ("" if knn is None else f"; its final encoder's kNN accuracy {100 * knn:.2f}%"))


def write_results(result: dict[str, Any], run: Path, command: str, load: float) -> Path:
    """benchmarks/results/inversion.md + inversion.png."""
    atomic_write_bytes(RESULTS / FIGURE_FILE, (run / FIGURE_FILE).read_bytes())
    settings, floor = result["settings"], result["floor"]
    text = (f"# What a split server can see: the inversion attack on MocoSFL\n\n"
            f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread(s), code {result['code_version']}; load average {load:.1f} "
            "when it started" + (" (above the core count: other jobs shared the machine, the time is an upper "
                                 "bound)" if load > (os.cpu_count() or 1) else "") + ".\n\n"
            f"    {command}\n\n"
            f"The run: `{run}` ({describe_run(run)}). For each cut the server takes the client layers of the FINAL encoder "
            f"(frozen), trains a decoder (`fedssl/privacy/decoder.py`, {settings['hidden']} channels) for "
            f"{settings['steps']} Adam steps of {settings['batch_size']} images on its own images ({result['aux']}), "
            f"then decodes the activations of {result['client_images']} of the clients' training images. PSNR and "
            f"SSIM: torchmetrics, pixels in [0, 1], mean per image. The floor, a guess that uses no activation (the "
            f"auxiliary set's mean image): {floor['psnr']:.2f} dB, SSIM {floor['ssim']:.3f}. Client memory: one "
            f"real MocoSFL client step measured at that cut. The attack took {result['seconds']:.0f} s.\n\n"
            + markdown_table(HEADER, table_rows(result)) + f"\n![inversion]({FIGURE_FILE})\n")
    atomic_write_text(RESULTS / "inversion.md", text)
    return RESULTS / "inversion.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished split run to attack (default: pre-train the MocoSFL preset)")
    parser.add_argument("--preset", default=str(PRESET), help="the split preset pre-trained without --run")
    parser.add_argument("--data-dir", default="../shared/data", help="folder with cifar-10-batches-py")
    parser.add_argument("--runs", default="runs/inversion", help="where the pre-training's run directory goes")
    parser.add_argument("--rounds", type=int, default=0, help="pre-training rounds (default: the preset's)")
    parser.add_argument("--cuts", type=int, nargs="+", help="cuts to attack (default: fedssl attack's)")
    parser.add_argument("--steps", type=int, help="decoder steps per cut (default: fedssl attack's)")
    parser.add_argument("--images", type=int, help="client images scored (default: fedssl attack's)")
    args = parser.parse_args()
    console = Console()
    load = os.getloadavg()[0]
    run = Path(args.run) if args.run else pretrain(Path(args.preset), args.data_dir, Path(args.runs), args.rounds,
                                                   console)
    given = {k: (tuple(v) if k == "cuts" else v) for k in ("cuts", "steps", "images")
             if (v := getattr(args, k)) is not None}
    result = attack_run(run, replace(InversionConfig(), **given))
    console.print(markdown_table(HEADER, table_rows(result)))
    command = "python benchmarks/inversion.py " + shlex.join(sys.argv[1:])
    console.print(f"wrote {write_results(result, run, command.strip(), load)}")


if __name__ == "__main__":
    main()
