"""FedMAE vs end-to-end federated MAE vs LW-FedSSL on the real CIFAR-10 subset (32x32, patch 4).

    python benchmarks/fedmae_accuracy.py --data-dir ../shared/data        # ~20 min on one core of a busy 2-core machine
    python benchmarks/fedmae_accuracy.py --quick                          # < 3 min: proves it works

Every setting is a full run of the in-process engine with the same ViT (width 64, 4 blocks,
4 heads, patch 4), the same 10 Dirichlet(0.5) clients, 12 rounds of one local epoch and the
same seed; they differ only in the method:

- FedMAE, stage-wise cascade (``configs/cifar10/fedmae.toml``): 4 stages x 3 rounds;
- FedMAE, independent cascade (each block on the patch embeddings alone, then stacked);
- end-to-end federated MAE (``mae.cascade=end-to-end``: FedAvg of the whole 4-block MAE);
- LW-FedSSL, plain (``configs/cifar10/lw-fedssl.toml``: MoCo v3, block by block).

Reported per setting: kNN and linear probe of the FINAL frozen encoder beside raw pixels and the
random-init encoder of the same architecture (and the difference), fine-tuning accuracy
(encoder + linear head, ``eval.finetune_epochs`` on the labelled train split, scored once on
test: MAE features are known to be weak under a linear probe), the client's measured peak
training memory and FLOPs per image, bytes per client over the run, and training wall time; then
whether each setting learned measurably and the FedMAE claim, judged only where both sides learned.
Runs are kept under ``--runs`` and resumed if the script is killed. Written to
benchmarks/results/fedmae_accuracy.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.floors import (FLOOR_NOTE, NOISE_NOTE, comparison_line, floor_cells, floor_header,  # noqa: E402
                               learning_line, measured_line, pct)
from fedssl.compare import Setting, run_comparison  # noqa: E402
from fedssl.config import load_toml  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402
from fedssl.resources import human_bytes, human_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEDMAE = load_toml(REPO / "configs" / "cifar10" / "fedmae.toml")
LW = load_toml(REPO / "configs" / "cifar10" / "lw-fedssl.toml")
SETTINGS: tuple[tuple[str, str, dict[str, Any], tuple[str, ...]], ...] = (
    ("fedmae-stagewise", "FedMAE, stage-wise cascade", FEDMAE, ()),
    ("fedmae-independent", "FedMAE, independent cascade (ablation)", FEDMAE, ("mae.cascade=independent",)),
    ("mae-end-to-end", "end-to-end federated MAE (same 4 blocks)", FEDMAE, ("mae.cascade=end-to-end",)),
    ("lw-fedssl", "LW-FedSSL, plain (MoCo v3)", LW, ()),
)
QUICK = ("clients=4", "rounds=4", "layerwise.rounds_per_stage=1", "local_steps=2", "batch_size=32",
         "eval.probe_epochs=3", "eval.every=0", "eval.finetune_epochs=1")


def settings(args: argparse.Namespace) -> list[Setting]:
    common = (f"data_dir={args.data_dir}", f"threads={args.threads}", "download=false",
              f"eval.finetune_epochs={args.finetune_epochs}", *(QUICK if args.quick else ()))
    return [Setting(key, label, values, (*extra, *common), finetune=True) for key, label, values, extra in SETTINGS]


def table(rows: list[dict[str, Any]]) -> str:
    """One row per setting: the floor columns (kNN and probe), fine-tuning, the measured client cost."""
    return markdown_table(
        ["setting", *floor_header(), "fine-tune", "client peak memory", "client FLOPs/img", "comm per client (run)",
         "training time"],
        [[r["label"], *floor_cells(r), pct(r["finetune"]), human_bytes(r["memory"]), human_flops(r["flops"]),
          human_bytes(r["comm"]), f"{r['train_seconds'] / 60:.1f} min"] for r in rows])


def verdicts(rows: list[dict[str, Any]]) -> str:
    """Did each setting learn; the FedMAE paper's claim, tested only where both sides learned."""
    by = {r["key"]: (r["label"], r) for r in rows}
    lines = [learning_line(label, row) for label, row in by.values()]
    lines.append(comparison_line("FedMAE (stage-wise) at least as accurate as end-to-end federated MAE",
                                 by["fedmae-stagewise"], by["mae-end-to-end"]))
    lines.append(comparison_line("FedMAE (stage-wise) at least as accurate as LW-FedSSL (same ViT, same rounds)",
                                 by["fedmae-stagewise"], by["lw-fedssl"]))
    return "## Verdicts (kNN, computed from the table)\n\n" + "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    cfg = settings(args)[0].config()
    budget = (f"{cfg.local_steps} local steps" if cfg.local_steps else f"{cfg.local_epochs} local epoch(s)")
    return (f"# FedMAE vs end-to-end federated MAE vs LW-FedSSL (real CIFAR-10 subset)\n\n"
            f"{measured_line('fedmae_accuracy.py', argv)}\n\n"
            f"Data: the CIFAR-10 subset (5,085 train / 1,017 test images) over {cfg.clients} Dirichlet({cfg.alpha:g}) "
            f"clients. Network: ViT width {cfg.model.width}, {cfg.model.depth} blocks, {cfg.model.heads} heads, patch "
            f"{cfg.model.patch_size} (64 patches; MAE: 16 visible). {cfg.rounds} rounds of {budget}, batch "
            f"{cfg.batch_size}, AdamW, seed {cfg.seed}, for every setting (presets configs/cifar10/fedmae.toml and "
            f"lw-fedssl.toml). Accuracies of the FINAL encoders (kNN k {cfg.eval.knn_k} T {cfg.eval.knn_t:g} and a "
            "linear probe on frozen mean-pooled features; fine-tuning: the whole encoder + a linear head, "
            f"{cfg.eval.finetune_epochs} epochs on the train split, scored once on test). Client memory and FLOPs: "
            "one real client step, measured (staged methods: the larger of the first and the last stage); comm: "
            "bytes up + down per client over the run from the real payloads.\n\n" + FLOOR_NOTE + "\n\n"
            + table(rows) + "\n" + verdicts(rows) + "\n" + NOISE_NOTE + " No ceiling runs here: whether this ViT learns "
            "at all at this budget when trained centrally is the cpu comparison's ViT ceiling row (docs/RESULTS.md). "
            "Run directories (reports, reconstruction pictures): `"
            + str(args.runs) + "`.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny budget that proves it works")
    parser.add_argument("--runs", default=str(REPO / "runs" / "fedmae_accuracy"), help="run directories (resumed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fedmae_accuracy.md"))
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "cifar-10-batches-py" / "data_batch_1").is_file():
        raise SystemExit(f"no CIFAR-10 under {args.data_dir}: pass --data-dir with the folder holding cifar-10-batches-py")

    def progress(index: int, setting: Setting) -> None:
        print(f"[{index + 1}/{len(SETTINGS)}] {setting.label} ...", file=sys.stderr, flush=True)

    rows = run_comparison(settings(args), Path(args.runs), progress)
    text = render(rows, args, sys.argv[1:] if argv is None else list(argv))
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
