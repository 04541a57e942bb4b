"""MocoSFL vs centralized MoCo vs end-to-end FedMoCo on the real CIFAR-10 subset: accuracy and client cost.

    python benchmarks/mocosfl_accuracy.py --data-dir ../shared/data --threads 1   # ~28 min, one core of a busy 2-core box

Four full runs through the in-process engine on the same images, the same 100 clients with 2 shards
each (about 2 classes per client), the same network and about the same image-steps (8 passes over
the data), from the presets

- configs/cifar10/mocosfl.toml: MocoSFL, cut 1, 1 image per client per step (server batch 100), 8 sync
  periods of 50 steps;
- configs/cifar10/mocosfl_compare_centralized.toml: centralized MoCo v2 on the pooled images, batch 100
  (the MocoSFL server batch), 400 steps; and the same with batch 32, one epoch a round (1,272 steps:
  the batch of the cpu comparison's ceiling);
- configs/cifar10/mocosfl_compare_fedmoco.toml: FedAvg of the whole MoCo v2 model over the same clients.

The presets trained a ResNet-18 with GroupNorm of 2 channels per group until 2026-12-07, which did not
learn at this budget (its centralized reference gained 6.7 kNN points over random init, FedMoCo 0.6);
they now hold the network the project has shown to learn (the ResNet-10 width 16 with GroupNorm of 8
channels per group of ``fedssl bench compare --preset cpu``, 8 passes, no blur), trained here as they are.

The tables: kNN and linear probe of the FINAL encoders beside raw pixels and the random-init encoder of
the same architecture (and the difference); client memory, FLOPs per image on the client and on the
server, bytes per step / per sync / per client over the run. The verdicts test MocoSFL against a
centralized ceiling only where that ceiling gained >= 10 kNN points (benchmarks/floors.py). Run
directories are kept under ``--runs`` and resumed if the script is killed. Written to
benchmarks/results/mocosfl_accuracy.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.floors import (FLOOR_NOTE, NOISE_NOTE, comparison_line, floor_cells, floor_header,  # noqa: E402
                               learning_line, measured_line)
from fedssl.compare import Setting, run_comparison  # noqa: E402
from fedssl.config import load_toml  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402
from fedssl.resources import DOWNLOAD, UPLOAD, Ledger, human_bytes, human_flops  # noqa: E402
from fedssl.run_dir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "cifar10"
# key, label, preset, overrides (settings() adds the data dir, threads and no monitor to each)
SETTINGS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("mocosfl", "MocoSFL-1 (100 clients x 1 image / step)", "mocosfl.toml", ()),
    ("centralized-b100", "centralized MoCo v2 (pooled, batch 100)", "mocosfl_compare_centralized.toml", ()),
    ("centralized-b32", "centralized MoCo v2 (pooled, batch 32)", "mocosfl_compare_centralized.toml",
     ("batch_size=32", "local_steps=0", "local_epochs=1")),
    ("fedmoco", "FedMoCo end-to-end (100 clients, 1 local epoch)", "mocosfl_compare_fedmoco.toml", ()),
)


class _Progress:
    """Prints one line per round."""

    def __init__(self, name: str) -> None:
        self.name = name

    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None:
        knn = f", kNN {100 * row['knn_acc']:.1f}%" if row.get("knn_acc") is not None else ""
        print(f"{self.name} round {row['round']}: loss {row['loss']:.3f}, {row['images_per_s']:.0f} images/s{knn}",
              file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)


def settings(args: argparse.Namespace) -> list[Setting]:
    common = ("eval.every=0", f"data_dir={args.data_dir}", f"threads={args.threads}", "download=false")
    return [Setting(key, label, load_toml(PRESETS / preset), (*extra, *common))
            for key, label, preset, extra in SETTINGS]


def traffic(ledger: Ledger) -> dict[str, float | None]:
    """Bytes per step (split methods: activations up, gradients down), per sync and per client over the run."""
    ups = [r for r in ledger.rows if r["kind"] == UPLOAD]
    downs = [r for r in ledger.rows if r["kind"] == DOWNLOAD]
    split = bool(ups) and "activation_bytes" in ups[0]
    return {
        "up_per_step": statistics.median(r["activation_bytes"] / r["steps"] for r in ups) if split else None,
        "down_per_step": statistics.median(r["gradient_bytes"] / r["steps"] for r in downs) if split else None,
        "up_per_sync": statistics.median(r["weight_bytes"] if split else r["bytes"] for r in ups) if ups else 0.0,
        "down_per_sync": min(r["weight_bytes"] if split else r["bytes"] for r in downs) if downs else 0.0,
    }


def _opt(value: float | None, fmt: Any) -> str:
    return "—" if value is None else fmt(value)


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["setting", *floor_header(), "optimizer steps (summed over clients)", "image-steps", "training time"],
        [[r["label"], *floor_cells(r), f"{r['optimizer_steps']:,}", f"{r['image_steps']:,}",
          f"{r['train_seconds'] / 60:.1f} min"] for r in rows])


def cost_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["setting", "client peak memory", "client FLOPs/img", "server FLOPs/img", "up / step (activations)",
         "down / step (gradients)", "up / sync (weights)", "down / sync (weights)", "total per client (run)"],
        [[r["label"], human_bytes(r["memory"]), human_flops(r["flops"]), _opt(r["server_flops"], human_flops),
          _opt(r["up_per_step"], human_bytes), _opt(r["down_per_step"], human_bytes), human_bytes(r["up_per_sync"]),
          human_bytes(r["down_per_sync"]), human_bytes(r["comm"])] for r in rows])


def verdicts(rows: list[dict[str, Any]]) -> str:
    """Did each run learn; MocoSFL within 3 points of each centralized ceiling that learned; MocoSFL above FedMoCo."""
    by = {r["key"]: (r["label"], r) for r in rows}
    lines = [learning_line(label, row) for label, row in by.values()]
    for ceiling in ("centralized-b100", "centralized-b32"):
        lines.append(comparison_line(f"MocoSFL within 3 points of {by[ceiling][0]}", by["mocosfl"], by[ceiling],
                                     margin=0.03, ceiling=True))
    lines.append(comparison_line("MocoSFL above FedMoCo (same clients)", by["mocosfl"], by["fedmoco"]))
    return "## Verdicts (kNN, computed from the table)\n\n" + "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    return ("# MocoSFL vs centralized MoCo vs FedMoCo (real CIFAR-10 subset)\n\n"
            f"{measured_line('mocosfl_accuracy.py', argv)}\n\n"
            "Data: the CIFAR-10 subset (5,085 train / 1,017 test images); 100 clients, 2 shards each (about 2 "
            "classes per client). Network: ResNet-10 width 16, GroupNorm of 8 channels per group + weight "
            "standardisation, 8 passes over the data, no blur (the setting of `fedssl bench compare --preset cpu`, "
            "which learns; this script used to train the presets' ResNet-18 with GroupNorm of 2 channels per group, "
            "which started at 14.65% kNN and did not learn at its budget: its centralized reference gained 6.7 "
            "points, so its \"within 3 points of centralized\" verdict of 2026-11-21 was withdrawn; the presets "
            "now hold this network). Presets: configs/cifar10/mocosfl.toml, mocosfl_compare_centralized.toml, "
            "mocosfl_compare_fedmoco.toml, as they are (no evaluation during the rounds). Accuracies of the FINAL "
            "encoders (kNN k 200 T 0.1, linear probe on frozen features; nothing selected on the test split). "
            "Client memory and FLOPs are measured on a real client step; bytes are the real payloads (per step: one client's activations up / gradients down; per "
            "sync: its client-net weights; total: mean over clients of up + down over the run). FedMoCo has no "
            "steps that cross the wire: its per-sync figures are the whole model.\n\n" + FLOOR_NOTE + "\n\n"
            "## Accuracy\n\n" + accuracy_table(rows) + "\n## Client cost\n\n" + cost_table(rows) + "\n"
            + verdicts(rows) + "\n" + NOISE_NOTE + f" Run directories (reports): `{args.runs}`.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar-10-batches-py (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=str(REPO / "runs" / "mocosfl_accuracy"), help="run directories (resumed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mocosfl_accuracy.md"))
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "cifar-10-batches-py" / "data_batch_1").is_file():
        raise SystemExit(f"no CIFAR-10 under {args.data_dir}: pass --data-dir with the folder holding cifar-10-batches-py")

    def progress(index: int, setting: Setting) -> _Progress:
        print(f"[{index + 1}/{len(SETTINGS)}] {setting.label} ...", file=sys.stderr, flush=True)
        return _Progress(setting.key)

    rows = run_comparison(settings(args), Path(args.runs), progress)
    for row in rows:
        row.update(traffic(Ledger.from_jsonl(RunDir(Path(args.runs) / row["key"]).ledger)))
    text = render(rows, args, sys.argv[1:] if argv is None else list(argv))
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
