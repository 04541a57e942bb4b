"""Federation overhead of the demo preset: centralized MoCo vs FedMoCo with 10 and 100 clients.

    python benchmarks/federation_overhead.py --data-dir ../shared/data

Prints images/s (one full pass over the training split, after a warm-up pass),
the ratio to centralized, the client's peak training memory and each setting's
process peak RSS, all measured in this one invocation; also written to
benchmarks/results/federation_overhead.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedssl.bench import run_overhead_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py (default: the cache)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "federation_overhead.md"),
                        help="where the table is also written as markdown")
    args = parser.parse_args()
    run_overhead_benchmark(Console(), data_dir=args.data_dir, out=Path(args.out))
