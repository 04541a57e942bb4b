"""Federation overhead of the demo preset: centralized MoCo vs FedMoCo with 10 and 100 clients.

    python benchmarks/federation_overhead.py --data-dir ../shared/data

Prints images/s (one full pass over the training split, after a warm-up pass),
the ratio to centralized, the client's peak training memory and each setting's
process peak RSS, all measured in this one invocation.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from fedssl.bench import run_overhead_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py (default: the cache)")
    run_overhead_benchmark(Console(), data_dir=parser.parse_args().data_dir)
