"""Shared fixtures: where the real data lives, and a fast, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The read-only real data beside the repository (../shared/data), or $FEDSSL_SHARED_DATA."""
    return Path(os.environ.get("FEDSSL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cifar_subset_dir() -> Path:
    """Folder that holds cifar-10-batches-py (the real CIFAR-10 subset); skips where absent."""
    root = shared_data_dir()
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 subset not found under {root} (set FEDSSL_SHARED_DATA)")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where there is no CUDA device (benchmarks/gpu_check.sh runs them: -m cuda)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU: bash benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
