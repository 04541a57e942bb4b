"""MocoSFL vs centralized MoCo vs end-to-end FedMoCo on the real CIFAR-10 subset: accuracy and client cost.

    python benchmarks/mocosfl_accuracy.py --data-dir ../shared/data

Three full runs through the in-process engine, one preset each (same network: ResNet-18 width 16 with
GroupNorm; same images; same number of image-steps):

- configs/cifar10/mocosfl.toml: 100 non-IID clients (shards), cut 1, 1 image per client per step;
- configs/cifar10/mocosfl_compare_centralized.toml: MoCo v2 on the pooled images, batch 100;
- configs/cifar10/mocosfl_compare_fedmoco.toml: FedAvg of the whole MoCo v2 model over the same clients.

Each run leaves a run directory (``--runs``, default runs/mocosfl_accuracy/) whose report.md, final.json
and plots are copied to benchmarks/results/mocosfl_accuracy/<run>/. The side-by-side table (kNN and
linear probe of the FINAL encoders, client memory, FLOPs per image on the client and on the server,
bytes per step / per sync / per client over the run, wall time) is printed and written to
benchmarks/results/mocosfl_accuracy.md with the date and the machine. About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedssl.config import load_toml, make_config
from fedssl.engines.local import start_run
from fedssl.io import atomic_write_text
from fedssl.resources import DOWNLOAD, STEP_COST, UPLOAD, Ledger, human_bytes, human_flops

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "cifar10"
RESULTS = REPO / "benchmarks" / "results"
SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("mocosfl", "MocoSFL-1 (100 clients x 1 image / step)", "mocosfl.toml"),
    ("centralized", "centralized MoCo v2 (pooled, batch 100)", "mocosfl_compare_centralized.toml"),
    ("fedmoco", "FedMoCo end-to-end (100 clients, 1 local epoch)", "mocosfl_compare_fedmoco.toml"),
)


class _Progress:
    """Prints one line per round."""

    def __init__(self, console: Console, name: str) -> None:
        self.console, self.name = console, name

    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None:
        knn = f", kNN {100 * row['knn_acc']:.1f}%" if row.get("knn_acc") is not None else ""
        self.console.print(f"[dim]{self.name} round {row['round']}: loss {row['loss']:.3f}, "
                           f"{row['images_per_s']:.0f} images/s{knn}[/dim]")

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{self.name}: {text}[/dim]")


def client_figures(ledger: Ledger) -> dict[str, float | None]:
    """Per-client cost read off a run's ledger (measured step, real payloads)."""
    step = next(r for r in ledger.rows if r["kind"] == STEP_COST)
    server = [r for r in ledger.rows if r["kind"] == "server_step_cost"]
    ups = [r for r in ledger.rows if r["kind"] == UPLOAD]
    downs = [r for r in ledger.rows if r["kind"] == DOWNLOAD]
    split = bool(ups) and "activation_bytes" in ups[0]
    per_client: dict[int, int] = {}
    for r in ups + downs:  # only clients that sent or received (not the server's cost row)
        per_client[r["client"]] = per_client.get(r["client"], 0) + int(r["bytes"])
    return {
        "client_peak_bytes": step["peak_training_bytes"],
        "client_flops": step["flops_per_image"],
        "server_flops": server[-1]["flops_per_image"] if server else None,
        "up_per_step": statistics.median(r["activation_bytes"] / r["steps"] for r in ups) if split else None,
        "down_per_step": statistics.median(r["gradient_bytes"] / r["steps"] for r in downs) if split else None,
        "up_per_sync": statistics.median(r["weight_bytes"] if split else r["bytes"] for r in ups),
        "down_per_sync": min(r["weight_bytes"] if split else r["bytes"] for r in downs),
        "total_per_client": statistics.mean(per_client.values()),
    }


def run_setting(key: str, preset: str, data_dir: str, runs: Path, console: Console) -> dict[str, Any]:
    cfg = make_config(load_toml(PRESETS / preset), [f"data_dir={data_dir}"])
    path = runs / key
    if path.exists():
        shutil.rmtree(path)
    start = time.perf_counter()
    out = start_run(cfg, path, observer=_Progress(console, key))
    wall = time.perf_counter() - start
    target = RESULTS / "mocosfl_accuracy" / key
    if target.exists():
        shutil.rmtree(target)
    (target / "plots").mkdir(parents=True)
    for name in ("report.md", "final.json"):
        shutil.copy(path / name, target / name)
    for plot in (path / "plots").glob("*.png"):
        shutil.copy(plot, target / "plots" / plot.name)
    images = sum(int(m["images"]) for m in out.metrics)
    return {"key": key, "knn": out.final["knn_acc"], "probe": out.final.get("probe_acc"),
            "knn_init": out.initial["knn_acc"], "image_steps": images, "wall_s": wall,
            **client_figures(out.ledger)}


def _opt(value: float | None, fmt) -> str:
    return "—" if value is None else fmt(value)


COLUMNS = ("setting", "kNN: random init", "kNN", "trained - random init", "linear probe", "client peak memory", "client FLOPs/img", "server FLOPs/img",
           "up / step (activations)", "down / step (gradients)", "up / sync (weights)", "down / sync (weights)",
           "total per client (run)", "image-steps", "wall time")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    labels = {key: label for key, label, _ in SETTINGS}
    return [[labels[r["key"]], f"{100 * r['knn_init']:.2f}%", f"{100 * r['knn']:.2f}%",
             f"{100 * (r['knn'] - r['knn_init']):+.2f} points", _opt(r["probe"], lambda v: f"{100 * v:.2f}%"),
             human_bytes(r["client_peak_bytes"]), human_flops(r["client_flops"]), _opt(r["server_flops"], human_flops),
             _opt(r["up_per_step"], human_bytes), _opt(r["down_per_step"], human_bytes),
             human_bytes(r["up_per_sync"]), human_bytes(r["down_per_sync"]), human_bytes(r["total_per_client"]),
             f"{r['image_steps']:,}", f"{r['wall_s'] / 60:.1f} min"] for r in rows]


def verdict(rows: list[dict[str, Any]]) -> str:
    by = {r["key"]: r for r in rows}
    gap = 100 * (by["mocosfl"]["knn"] - by["centralized"]["knn"])
    lead = 100 * (by["mocosfl"]["knn"] - by["fedmoco"]["knn"])
    learned = 100 * (by["centralized"]["knn"] - by["centralized"]["knn_init"])
    text = (f"kNN: MocoSFL - centralized = {gap:+.2f} points (goal: within 3 points) "
            f"[{'met' if abs(gap) <= 3 else 'NOT met'}]; MocoSFL - FedMoCo = {lead:+.2f} points (goal: > 0) "
            f"[{'met' if lead > 0 else 'NOT met'}].")
    if learned < 10:
        text += (f" But the centralized reference itself gained only {learned:+.2f} points over its random init "
                 "(goal for a ceiling: >= 10): it barely trained, so being within 3 points of it says little.")
    return text


def _shown(path: Path) -> str:
    """A path as the result file shows it: relative to the repository where it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_markdown(rows: list[dict[str, Any]], path: Path, data_dir: str, runs: str) -> None:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(cells) + " |\n" for cells in table_rows(rows))
    text = (f"# MocoSFL vs centralized MoCo vs FedMoCo (real CIFAR-10 subset)\n\n"
            f"Measured {datetime.date.today().isoformat()} on {machine()} by "
            f"`python benchmarks/mocosfl_accuracy.py --data-dir {data_dir}`.\n\n"
            "Data: the CIFAR-10 subset (5,085 train / 1,017 test images); 100 clients, 2 shards each "
            "(about 2 classes per client). Network: ResNet-18 width 16, GroupNorm + weight standardisation. "
            "Presets: configs/cifar10/mocosfl.toml, mocosfl_compare_centralized.toml, "
            "mocosfl_compare_fedmoco.toml. Accuracies of the FINAL encoders (kNN k 200 T 0.1, linear probe on "
            "frozen features; nothing selected on the test split). Client memory and FLOPs are measured on a "
            "real client step; bytes are the real payloads (per step: one client's activations up / "
            "gradients down; per sync: its client-net weights; total: mean over clients of up + down over "
            "the run). FedMoCo has no steps that cross the wire: its per-sync figures are the whole model.\n\n"
            + header + body + "\n" + verdict(rows) + "\n\n"
            f"Run reports (run directories, not committed): {runs}/{{mocosfl,centralized,fedmoco}}/report.md\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar-10-batches-py (default ../shared/data)")
    parser.add_argument("--runs", default=str(REPO / "runs" / "mocosfl_accuracy"), help="where the run directories go")
    args = parser.parse_args()
    console = Console(width=max(200, Console().width))
    if not (Path(args.data_dir) / "cifar-10-batches-py" / "data_batch_1").is_file():
        raise SystemExit(f"no CIFAR-10 under {args.data_dir}: pass --data-dir with the folder holding cifar-10-batches-py")
    rows = []
    for key, label, preset in SETTINGS:
        console.print(f"[bold]{label}[/bold] ({preset})")
        rows.append(run_setting(key, preset, args.data_dir, Path(args.runs), console))
    table = Table(title="MocoSFL vs centralized MoCo vs FedMoCo, CIFAR-10 subset, ResNet-18 width 16 (GroupNorm)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    console.print(verdict(rows))
    write_markdown(rows, RESULTS / "mocosfl_accuracy.md", args.data_dir, _shown(Path(args.runs)))
    console.print(f"written: {RESULTS / 'mocosfl_accuracy.md'}")


if __name__ == "__main__":
    main()
