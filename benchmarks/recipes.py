"""What holds learning back at this scale: one ablation table, every choice read on a VALIDATION split.

    python benchmarks/recipes.py --data-dir ../shared/data                 # the demo's ablations (FedMoCo, ResNet)
    python benchmarks/recipes.py --group norm --group vit --jobs 2         # some groups only, two runs at a time
    python benchmarks/recipes.py --list                                    # the groups and their variants

Every variant is a real ``fedssl run`` (a run directory under ``runs/recipes/``; a killed
benchmark continues where it stopped) on the real CIFAR-10 subset, with
``eval.val_fraction = 0.2``: a fifth of the TRAINING split is held out before partitioning,
no client sees it, and the table's accuracies are kNN (cosine, k 200, T 0.1, bank = the rest
of the training split) on that validation split. The test split is not read by any choice
made here. Each row stands beside the random-init encoder of the same architecture and raw
pixels, and gives the optimizer steps (summed over clients) and image-steps it took.

The groups ablate, one factor at a time from a base recipe, what plausibly holds learning back:
optimizer steps vs epochs, width, GroupNorm group size vs BatchNorm, Gaussian blur on 32x32
images, learning rate, batch size, temperature, and the ViT recipe (AdamW lr, warm-up, patch).
Written to benchmarks/results/recipes.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.compare import Setting, ensure_run, summarize_run  # noqa: E402
from fedssl.config import load_toml  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402
from fedssl.run_pool import run_in_processes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = load_toml(REPO / "configs" / "cifar10" / "fedmoco.toml")
# what every variant shares: the selection protocol (validation split, kNN only), one seed, and HALF the demo's
# budget (6 rounds of one local epoch; a variant may change it): one factor at a time from there
COMMON = ["eval.val_fraction=0.2", "eval.probe=false", "eval.every=0", "download=false", "rounds=6"]

# the ViT recipe the "vit" group varies (FedMoCo v3 on the demo's clients)
VIT = ("method=fedmocov3", "model.arch=vit", "model.width=64", "model.depth=4", "model.heads=4", "model.patch_size=4",
       "optimizer=adamw", "lr=1e-3", "weight_decay=0.05")
# group -> (variant name, overrides on top of the demo preset); the first variant of a group is its base
GROUPS: dict[str, list[tuple[str, list[str]]]] = {
    "steps": [
        ("6 rounds x 1 epoch, batch 64", []),
        ("batch 32 (2x steps, same epochs)", ["batch_size=32"]),
        ("batch 16 (4x steps, same epochs)", ["batch_size=16"]),
        ("3 rounds x 2 epochs (same steps, fewer averagings)", ["rounds=3", "local_epochs=2"]),
        ("12 rounds x 1 epoch (2x steps and epochs)", ["rounds=12"]),
    ],
    "lr": [
        ("lr 0.06", []),
        ("lr 0.03", ["lr=0.03"]),
        ("lr 0.12", ["lr=0.12"]),
        ("lr 0.24", ["lr=0.24"]),
    ],
    "augment": [
        ("mocov2 views (blur p 0.5)", []),
        ("no blur on 32x32", ["ssl.blur=false"]),
        ("simclr views (crop 0.08-1, strong colour), no blur", ["ssl.augment=simclr", "ssl.blur=false"]),
    ],
    "server": [
        ("FedAvg", []),
        ("FedAvgM: server momentum 0.9", ["server_momentum=0.9"]),
        ("FedAvgM: server momentum 0.9, batch 32", ["server_momentum=0.9", "batch_size=32"]),
    ],
    "temperature": [
        ("T 0.2", []),
        ("T 0.1", ["ssl.temperature=0.1"]),
        ("T 0.5", ["ssl.temperature=0.5"]),
    ],
    "norm": [
        ("BatchNorm", []),
        ("GroupNorm, 2 channels/group", ["model.norm=group", "model.group_channels=2"]),
        ("GroupNorm, 8 channels/group", ["model.norm=group", "model.group_channels=8"]),
        ("GroupNorm, 16 channels/group", ["model.norm=group", "model.group_channels=16"]),
    ],
    "width": [
        ("width 16", []),
        ("width 8", ["model.width=8"]),
        ("width 32", ["model.width=32"]),
    ],
    "method": [
        ("FedMoCo v2", []),
        ("FedSimCLR", ["method=fedsimclr"]),
        ("centralized MoCo v2 (same epochs)", ["method=centralized"]),
    ],
    "vit": [
        ("ViT w64 d4 p4, AdamW 1e-3", [*VIT]),
        ("AdamW 3e-3", [*VIT, "lr=3e-3"]),
        ("patch 8", [*VIT, "model.patch_size=8"]),
        ("warm-up 2 rounds", [*VIT, "warmup_rounds=2"]),
        ("12 rounds x 1 epoch (2x steps and epochs)", [*VIT, "rounds=12"]),
    ],
}


def _key(overrides: tuple[str, ...]) -> str:
    """The run folder of a variant: a digest of its overrides (stable when a new config key with a default is added;
    ``ensure_run`` still refuses a folder whose config differs)."""
    return hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:16]


def settings(groups: list[str], extra: list[str]) -> list[Setting]:
    """One setting per (group, variant); a run folder per distinct variant (a group's base is the demo)."""
    return [Setting(key=_key((*COMMON, *overrides, *extra)), label=name, values=DEMO, group=group,
                    overrides=(*COMMON, *overrides, *extra))
            for group in groups for name, overrides in GROUPS[group]]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        gain = None if r["val_knn"] is None else r["val_knn"] - r["val_knn_init"]
        body.append([r["group"], r["label"], _pct(r["val_knn_pixels"]), _pct(r["val_knn_init"]), _pct(r["val_knn"]),
                     "—" if gain is None else f"{100 * gain:+.2f}", f"{r['optimizer_steps']:,}",
                     f"{r['image_steps']:,}", f"{r['train_seconds']:.0f}"])
    return markdown_table(["group", "variant", "raw pixels", "random init", "trained", "trained - random init",
                           "optimizer steps", "image-steps", "train s"], body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), help="a group to run (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "recipes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipes.md")
    parser.add_argument("--set", action="append", default=[], help="an override for every variant")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="write the table of the finished runs; run nothing")
    args = parser.parse_args(argv)
    if args.list:
        for group, variants in GROUPS.items():
            print(group + ": " + "; ".join(name for name, _ in variants))
        return 0
    groups = args.group or list(GROUPS)
    extra = [f"data_dir={args.data_dir}", f"threads={args.threads}", f"seed={args.seed}", *args.set]
    todo = settings(groups, extra)
    if not args.table_only:
        distinct = list({s.key: s for s in todo}.values())
        run_in_processes(ensure_run, distinct, args.runs, max(1, args.jobs))  # each run in its own process
    done = [s for s in todo if (args.runs / s.key / "final.json").is_file()]
    rows = [{"label": s.label, "group": s.group, **summarize_run(args.runs / s.key)} for s in done]
    missing = [f"{s.group}: {s.label}" for s in todo if s not in done]
    text = (f"# Recipe ablations (validation split)\n\nMeasured {datetime.date.today()} with "
            f"`python benchmarks/recipes.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
            f"seed {args.seed}, {args.threads} torch threads per run, {args.jobs} run(s) at a time. "
            "kNN accuracy (%) on the validation split (a fifth of the training split, never trained on).\n\n"
            + table(rows) + ("\nNot run yet (`--table-only` shows finished runs only): " + "; ".join(missing) + ".\n"
                             if missing else ""))
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
