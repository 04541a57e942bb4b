"""What every result stands beside: the random-init encoder of the FINAL architecture and raw pixels; a validation
split no client sees; per-client ledgers that count clients only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedssl.config import make_config
from fedssl.engines.local import load_federation, start_run
from fedssl.evaluation import PixelEncoder
from fedssl.methods import build_method
from fedssl.methods.base import MethodContext
from fedssl.report import learning_verdict, result_section
from fedssl.resources import SERVER_ID, Ledger
from tests.helpers import TINY, tiny_config

VIT = ("model.arch=vit", "model.width=16", "model.depth=3", "model.heads=2", "model.patch_size=8")


@pytest.mark.parametrize("method", ["lw-fedssl", "prog-fedssl", "fedmae"])
def test_a_staged_methods_random_init_is_the_full_depth_network(method: str) -> None:
    cfg = tiny_config(f"method={method}", *VIT, "rounds=3", "layerwise.rounds_per_stage=1")
    fed = load_federation(cfg, pooled=False)
    staged = build_method(MethodContext(cfg, fed.train.info, torch.device("cpu")))
    first_stage, initial = staged.encoder(), staged.initial_encoder()
    staged.enter_round(cfg.rounds - 1)  # the last stage: what the run ends with
    final = staged.encoder()
    assert first_stage.num_layers() < initial.num_layers() == final.num_layers() == staged.backbone.num_layers()
    images = torch.rand(2, 3, 32, 32)
    assert initial.eval()(images).shape == final.eval()(images).shape == (2, final.feature_dim)


def test_a_staged_runs_baseline_has_the_final_encoders_features(tmp_path: Path) -> None:
    out = start_run(tiny_config("method=lw-fedssl", *VIT, "rounds=3", "layerwise.rounds_per_stage=1",
                                "eval.probe=false", "eval.every=0"), tmp_path / "run")
    assert out.initial["feature_dim"] == out.final["feature_dim"] == 16


def test_every_run_records_raw_pixels_and_flags_an_encoder_that_did_not_learn(tmp_path: Path) -> None:
    out = start_run(tiny_config("eval.val_fraction=0.25", "rounds=1", "eval.probe_epochs=2"), tmp_path / "run")
    pixels = out.initial["pixels"]
    assert pixels["feature_dim"] == 3 * 32 * 32 and 0 <= pixels["knn_acc"] <= 1 and pixels["val_knn_acc"] is not None
    report = out.run.report.read_text()
    assert "raw pixels" in report and "trained - random init" in report and "validation split" in report
    worse = {"knn_acc": 0.30, "pixels": {"knn_acc": 0.2}}
    assert "Did not learn" in learning_verdict(worse, {"knn_acc": 0.25})
    assert "Below raw pixels" in learning_verdict({"knn_acc": 0.1, "pixels": {"knn_acc": 0.4}}, {"knn_acc": 0.3})
    assert learning_verdict(worse, {"knn_acc": 0.35}) == ""
    assert "Did not learn" in result_section(worse, {"knn_acc": 0.25, "probe_acc": 0.3})


def test_pixel_encoder_pools_large_images_to_32x32() -> None:
    assert PixelEncoder()(torch.rand(2, 3, 224, 224)).shape == (2, 3 * 32 * 32)
    assert PixelEncoder()(torch.rand(2, 1, 28, 28)).shape == (2, 28 * 28)


def test_the_validation_split_is_held_out_before_partitioning() -> None:
    cfg = make_config(TINY, ["eval.val_fraction=0.25"])
    fed = load_federation(cfg, pooled=False)
    plain = load_federation(make_config(TINY), pooled=False)
    assert fed.val is not None and len(fed.val) == 128 and len(fed.train) == 512 - 128
    assert sum(len(ix) for ix in fed.client_indices) == len(fed.train)  # no client holds a validation image
    seen = {tuple(x.flatten()[:16].tolist()) for x in fed.train.images}
    assert not any(tuple(x.flatten()[:16].tolist()) in seen for x in fed.val.images)
    assert fed.monitor is fed.val and plain.monitor is plain.test and plain.val is None


def test_bytes_per_client_count_clients_only_for_mocosfl(tmp_path: Path) -> None:
    cfg = tiny_config("method=mocosfl", "model.norm=group", "clients=10", "partition=iid", "rounds=2",
                      "split.sync_every=3", "split.client_batch=2", "eval.probe=false", "eval.every=0")
    out = start_run(cfg, tmp_path / "run")
    ledger = Ledger.from_jsonl(out.run.ledger)
    assert any(r["client"] == SERVER_ID for r in ledger.rows)  # the server's own step is recorded ...
    assert SERVER_ID not in ledger.clients() and ledger.clients() == list(range(10))  # ... but is no client
    per_client = ledger.bytes_per_client()
    total = sum(c["up"] + c["down"] for c in per_client.values())
    assert ledger.summary()["comm_bytes_mean"] == pytest.approx(total / 10)
    assert ledger.summary()["clients"] == 10


def test_optimizer_steps_sum_every_clients_uploads() -> None:
    ledger = Ledger()
    for client, steps in ((0, 3), (1, 5)):
        ledger.record(round=0, client=client, kind="upload", bytes=10, steps=steps)
    ledger.record(round=0, client=SERVER_ID, kind="server_step_cost", flops_per_image=1.0)
    assert ledger.optimizer_steps() == 8 and np.isclose(ledger.summary()["comm_bytes_mean"], 10)
