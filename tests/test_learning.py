"""Short real runs learn: on the real CIFAR-10 subset the FINAL encoder's kNN accuracy (final.json) is above the
random-init encoder's by a margin, for centralized MoCo v2 and for FedMoCo over 10 non-IID clients.

The net is ResNet-10 width 16 with the ImageNet stem (cheap on 32x32) and GroupNorm: it keeps no running
statistics, so an encoder that does not train scores exactly what its random init scores. (With BatchNorm the
running statistics alone moved kNN by +3.05 points at lr 1e-5: a margin test would pass for the wrong reason.)
Width 8 with GroupNorm collapsed to chance here; width 16 does not.

Measured on the 2-core machine, threads=1 (kNN k=200, T=0.1 on the 1,017 test images; gain in points):

| run | seed 0 | seed 1 | seed 2 | lr 1e-5 (seed 0) | CPU time |
| --- | --- | --- | --- | --- | --- |
| centralized | 19.76% -> 26.45% (+6.69) | 21.04% -> 27.04% (+6.00) | 19.57% -> 32.15% (+12.59) | -0.10 | 38 s |
| fedmoco     | 19.76% -> 27.14% (+7.37) | 21.04% -> 26.94% (+5.90) | 19.57% -> 24.98% (+5.41) | -0.10 | 37 s |

The tests run seed 0 and ask for MARGIN: every seed clears it, an encoder that does not learn does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedssl.engines.local import start_run
from tests.helpers import tiny_config

MARGIN = 0.03  # kNN accuracy points (as a fraction) the final encoder must gain over its random init

NET = ("model.width=16", "model.norm=group", "model.stem=imagenet", "ssl.proj_hidden=64", "ssl.proj_dim=32")
EVAL = ("eval.knn_k=200", "eval.every=0", "eval.probe=false", "threads=1")
RUNS: dict[str, tuple[str, ...]] = {
    # 200 steps of 128 images (5 epochs of the 5,085)
    "centralized": ("method=centralized", "rounds=2", "local_steps=100", "batch_size=128", "ssl.queue_size=1024",
                    "lr=0.06"),
    # Dirichlet(0.5) over 10 clients, 5 of them a round, 4 local steps of 64: 320 steps. Averaging often is what
    # learns in few steps: 4 rounds x 10 clients x 12 steps (480 steps) gained only +3.83 (seed 0).
    "fedmoco": ("method=fedmoco", "clients=10", "partition=dirichlet", "sample_fraction=0.5", "rounds=16",
                "local_steps=4", "batch_size=64", "ssl.queue_size=256", "lr=0.08"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", RUNS)
def test_a_short_real_run_ends_above_its_random_init_encoder(tmp_path: Path, cifar_subset_dir: Path,
                                                             method: str) -> None:
    cfg = tiny_config("dataset=cifar10", f"data_dir={cifar_subset_dir}", *NET, *EVAL, *RUNS[method])
    start_run(cfg, tmp_path / method)
    result = json.loads((tmp_path / method / "final.json").read_text())
    initial, final = result["initial"]["knn_acc"], result["final"]["knn_acc"]
    assert final >= initial + MARGIN, f"{method}: kNN {initial:.2%} at random init -> {final:.2%} trained"
