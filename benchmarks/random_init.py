"""The floor under every accuracy: each benchmark architecture untrained (random init) and raw pixels.

    python benchmarks/random_init.py --data-dir ../shared/data     # every architecture below, about 2 min

No training: each row builds the method of a benchmark's preset with its seed, and scores the
random-init encoder of the FINAL architecture and the normalised pixels with the protocol every
run uses (kNN cosine k 200 T 0.1 with the training split as the bank, and the linear probe, both
scored on the test split). A trained accuracy means something only above these. Written to
benchmarks/results/random_init.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.bench import machine_description  # noqa: E402
from fedssl.config import load_toml, make_config  # noqa: E402
from fedssl.engines.local import evaluate_baselines  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "cifar10"
# (architecture, the benchmark that trains it, preset, overrides)
ARCHITECTURES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("ResNet-10 width 16, BatchNorm", "make demo (configs/cifar10/fedmoco.toml)", "fedmoco.toml", ()),
    ("ResNet-10 width 16, GroupNorm 2 ch/group", "recipes.py (norm)", "fedmoco.toml", ("model.norm=group",)),
    ("ResNet-10 width 16, GroupNorm 8 ch/group", "recipes.py (norm); the cpu comparison; mocosfl_accuracy.py",
     "fedmoco.toml",
     ("model.norm=group", "model.group_channels=8")),
    ("ResNet-18 width 16, GroupNorm 2 ch/group", "the MocoSFL presets until 2026-12-07; mocosfl_speed.py",
     "mocosfl.toml", ("model.blocks_per_stage=[2,2,2,2]", "model.group_channels=0")),
    ("ViT width 64, 4 blocks, patch 4", "layerwise_accuracy.py, fedmae_accuracy.py; the cpu comparison",
     "lw-fedssl.toml", ()),
    ("ResNet-10 width 8, GroupNorm 2 ch/group", "the retired cpu-small comparison (docs/RESULTS.md)", "fedmoco.toml",
     ("model.norm=group", "model.width=8", "ssl.proj_hidden=256")),
    ("ViT width 32, 3 blocks, patch 4", "the retired cpu-small comparison (docs/RESULTS.md)", "lw-fedssl.toml",
     ("model.width=32", "model.depth=3", "model.heads=2", "layerwise.rounds_per_stage=0", "ssl.proj_hidden=128",
      "ssl.proj_dim=64")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "random_init.md")
    args = parser.parse_args(argv)
    rows = []
    for name, where, preset, overrides in ARCHITECTURES:
        cfg = make_config(load_toml(PRESETS / preset), [f"data_dir={args.data_dir}", "download=false",
                                                        f"threads={args.threads}", *overrides])
        print(f"{name} ...", file=sys.stderr, flush=True)
        scores = evaluate_baselines(cfg)
        init, pixels = scores["random_init"], scores["pixels"]
        rows.append([name, where, f"{init['feature_dim']}", f"{100 * pixels['knn_acc']:.2f}%",
                     f"{100 * init['knn_acc']:.2f}%", f"{100 * pixels['probe_acc']:.2f}%",
                     f"{100 * init['probe_acc']:.2f}%"])
    text = (f"# Random init and raw pixels of every benchmark architecture\n\nMeasured {datetime.date.today()} on "
            f"{machine_description()} by `python benchmarks/random_init.py --data-dir ../shared/data`: the real "
            "CIFAR-10 subset (5,085 train / 1,017 test), seed 0, no training; kNN (cosine, k 200, T 0.1, train "
            "split as the bank) and a linear probe (100 epochs) scored on the test split.\n\n"
            + markdown_table(["architecture", "trained by", "feature dim", "kNN: raw pixels", "kNN: random init",
                              "probe: raw pixels", "probe: random init"], rows))
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
