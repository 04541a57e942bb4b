"""Score exported encoder files as a user outside this repository would: kNN accuracy of the loaded file.

Each file written by ``fedssl export`` is loaded with torch alone (``torch.jit.load`` for ``.pt``,
``torch.export.load(...).module()`` for ``.pt2``), fed float images in [0, 1] (N, C, H, W) (the file
normalises them itself), and its features are scored with the kNN protocol every fedssl report uses:
cosine similarity, k 200, temperature 0.1, the whole train split as the bank, the test split as queries.
The table shows, per file, that accuracy and the one the run itself reported for its final encoder
(final.json), so a difference would show an export that does not compute what was trained.

    fedssl export runs/<demo run> --out demo.pt
    python benchmarks/exported_knn.py demo.pt --run runs/<demo run> --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.data.datasets import ImageData, load_split  # noqa: E402
from fedssl.evaluation import knn_accuracy  # noqa: E402

BATCH = 256


def load_exported(path: Path) -> torch.nn.Module:
    """The file as torch alone loads it."""
    return torch.export.load(str(path)).module() if path.suffix == ".pt2" else torch.jit.load(str(path))


@torch.no_grad()
def features(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the file's features (N, D), fed as float in [0, 1]."""
    return torch.cat([module(images[i:i + BATCH].float() / 255) for i in range(0, len(images), BATCH)])


def exported_knn(path: Path, train: ImageData, test: ImageData) -> float:
    """kNN accuracy of the file's features: ``train`` as the bank, ``test`` as the queries."""
    module = load_exported(path)
    return knn_accuracy(features(module, train.images), train.labels, features(module, test.images), test.labels,
                        k=200, temperature=0.1, num_classes=train.info.num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="files written by fedssl export (.pt or .pt2)")
    parser.add_argument("--run", type=Path, help="the run they came from (its final.json is shown beside)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reported = None
    if args.run is not None:
        reported = json.loads((args.run / "final.json").read_text())["final"]["knn_acc"]
    table = Table(title="exported encoders: kNN (cosine, k 200, T 0.1; train split bank, test split queries)")
    for column in ("file", "format", "kNN of the loaded file", "kNN the run reported"):
        table.add_column(column)
    train, test = (load_split(args.dataset, split, data_dir=args.data_dir or None, download=False)
                   for split in ("train", "test"))  # once for every file
    for path in args.files:
        acc = exported_knn(path, train, test)
        table.add_row(str(path), "torch.export" if path.suffix == ".pt2" else "TorchScript", f"{100 * acc:.2f}%",
                      "—" if reported is None else f"{100 * reported:.2f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
