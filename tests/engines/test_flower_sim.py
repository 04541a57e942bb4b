"""Every method on Flower's simulation runtime: the same metrics as the in-process engine for the same seed,
resume, faults rejected and logged, MocoSFL's per-step messages on real data.

Each Flower run starts Ray (about 10 s on 2 cores): the configs are tiny and few.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp

from fedssl.aggregation import weighted_average
from fedssl.cli import main
from fedssl.engines import read_engine, resume, start
from fedssl.engines.flower import client_app
from fedssl.engines.flower.server import FlowerRunner
from fedssl.engines.local import evaluate_run, export_run, load_federation, start_run
from fedssl.methods.base import MethodContext
from fedssl.methods.fedavg import FedMoCo
from fedssl.run_dir import read_jsonl
from fedssl.resources import Ledger
from tests.helpers import TINY, tiny_config

# one thread on both sides: float sums then run in the same order in the ClientApps and in-process
FLOWER_TINY = ("threads=1", "clients=2", "rounds=2", "local_steps=1", "batch_size=8", "eval.probe_epochs=1",
               "model.blocks_per_stage=[1,1]")
SAME = ("round", "loss", "clients", "images", "bytes_up", "bytes_down", "knn_acc", "dropped", "failed", "rejected")


def _same(rows: list[dict]) -> list[dict]:
    return [{k: row[k] for k in SAME if k in row} for row in rows]


def _set_args(*overrides: str) -> list[str]:
    items = [f"{k}={v}" for k, v in TINY.items() if not isinstance(v, dict)]
    items += [f"{section}.{k}={json.dumps(v).replace(' ', '')}" for section, values in TINY.items()
              if isinstance(values, dict) for k, v in values.items()]
    return [f"--set={item}" for item in items + list(overrides)]


def test_fedmoco_via_the_cli_on_flower_equals_the_in_process_engine(tmp_path: Path) -> None:
    flower = tmp_path / "flower"
    assert main(["run", *_set_args(*FLOWER_TINY), "--engine", "flower", "--out", str(flower), "--quiet"]) == 0
    local = start_run(tiny_config(*FLOWER_TINY), tmp_path / "local")
    rows = read_jsonl(flower / "metrics.jsonl")
    assert _same(rows) == _same(local.metrics)
    assert json.loads((flower / "final.json").read_text())["final"] == local.final
    assert read_engine(flower) == {"engine": "flower", "runtime": "simulation"}
    # the bytes of the messages beside the payload bytes: the payload plus a little framing
    ledger = Ledger.from_jsonl(flower / "ledger.jsonl")
    moved = [r for r in ledger.rows if r["kind"] in ("upload", "download")]
    assert len(moved) == 8 and all(r["bytes"] < r["wire_bytes"] < 2 * r["bytes"] for r in moved)
    assert all(row["wire_up"] > row["bytes_up"] for row in rows)
    log = (flower / "flower.log").read_text()
    assert "client 0 is node" in log and "client 1 is node" in log
    report = (flower / "report.md").read_text()
    assert "on the wire" in report
    # eval / export / report read a Flower run like any other
    assert evaluate_run(flower, probe=False)["knn_acc"] == pytest.approx(local.final["knn_acc"])
    assert export_run(flower, tmp_path / "encoder.pt") == (3, 32, 32)
    assert main(["report", str(flower)]) == 0


def test_lw_fedssl_resumed_on_flower_equals_the_in_process_engine(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in round 4 (after the stage change), resumed on Flower: the metrics of an uninterrupted in-process
    run; the fresh nodes of the resumed run get the frozen layers again (the ledger says so)."""
    cfg = tiny_config(*FLOWER_TINY, "method=lw-fedssl", "rounds=4", "clients=3", "sample_fraction=0.67")
    local = start_run(cfg, tmp_path / "local")
    real = FlowerRunner.run_round

    def killed_in_round_four(self, method, round_index, ledger, observer):  # type: ignore[no-untyped-def]
        if round_index == 3:
            raise RuntimeError("the server died in round 4")
        return real(self, method, round_index, ledger, observer)

    monkeypatch.setattr(FlowerRunner, "run_round", killed_in_round_four)
    with pytest.raises(RuntimeError, match="died in round 4"):
        start(cfg, tmp_path / "flower", engine="flower")
    monkeypatch.setattr(FlowerRunner, "run_round", real)
    assert torch.load(tmp_path / "flower" / "checkpoints" / "last.pt", weights_only=True)["round"] == 3
    resumed = resume(tmp_path / "flower")
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in local.metrics]
    assert [r["knn_acc"] for r in resumed.metrics] == [r["knn_acc"] for r in local.metrics]
    assert resumed.final == local.final
    assert _same(resumed.metrics[:3]) == _same(local.metrics[:3])
    assert resumed.metrics[3]["bytes_down"] > local.metrics[3]["bytes_down"]  # frozen layers re-sent to new nodes


FEDMAE = ("method=fedmae", "model.arch=vit", "model.width=16", "model.depth=2", "model.heads=2",
          "model.patch_size=8", "mae.decoder_width=16", "mae.decoder_heads=2", "optimizer=adamw", "lr=0.002",
          "weight_decay=0.05", "mae.pictures=1")


@pytest.mark.parametrize("method", ["prog-fedssl", "fedmae"])
def test_staged_methods_on_flower_equal_the_in_process_engine(tmp_path: Path, method: str) -> None:
    """Prog-FedSSL, and FedMAE: it reuses the staged method's client state (``held``) without a line of its own."""
    cfg = tiny_config(*FLOWER_TINY, *(FEDMAE if method == "fedmae" else (f"method={method}",)))
    flower = start(cfg, tmp_path / "flower", engine="flower")
    local = start_run(cfg, tmp_path / "local")
    assert _same(flower.metrics) == _same(local.metrics) and flower.final == local.final


def _faulty_client_app(faults: dict[int, str]) -> ClientApp:
    """The fedssl ClientApp, with some clients told (node config ``fault``) to corrupt their uploads."""
    app = ClientApp()

    def with_fault(handler):  # type: ignore[no-untyped-def]
        def handle(message, context):  # type: ignore[no-untyped-def]
            fault = faults.get(int(context.node_config["partition-id"]))
            if fault:
                context.node_config = {**context.node_config, "fault": fault}
            return handler(message, context)
        return handle

    app.query("hello")(with_fault(client_app.hello))
    app.train()(with_fault(client_app.train))
    return app


def test_nan_and_wrong_shaped_uploads_are_rejected_logged_and_never_averaged(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(*FLOWER_TINY, "clients=4", "rounds=1")
    monkeypatch.setattr(client_app, "app", _faulty_client_app({1: "nan", 2: "shape"}))
    out = start(cfg, tmp_path / "flower", engine="flower")
    assert (out.metrics[0]["rejected"], out.metrics[0]["failed"]) == (2, 0)
    log = (tmp_path / "flower" / "flower.log").read_text()
    assert "rejected the upload of client 1" in log and "NaN" in log
    assert "rejected the upload of client 2" in log and "has shape" in log
    # the new global model is the FedAvg of clients 0 and 3 alone (the same updates, computed here)
    fed = load_federation(cfg, pooled=False)
    method = FedMoCo(MethodContext(cfg, fed.train.info, torch.device("cpu")))
    torch.set_num_threads(1)
    results = [method.client.train(method.download(0, c), fed.client_data(c), round_index=0, client_id=c)
               for c in (0, 3)]
    want = weighted_average([r.upload for r in results], [r.num_samples for r in results])
    saved = torch.load(tmp_path / "flower" / "checkpoints" / "last.pt", weights_only=True)["method"]["global_model"]
    for key, value in want.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    assert np.isfinite(out.final["knn_acc"])
    assert "rejected" in (tmp_path / "flower" / "report.md").read_text()


@pytest.mark.slow
def test_mocosfl_per_step_messages_on_real_images(tmp_path: Path, cifar_subset_dir: Path) -> None:
    """forward / backward / sync messages, client nets kept on the nodes: the loss falls once the queue is full;
    the ledger holds the real activation, gradient and weight bytes."""
    cfg = tiny_config("method=mocosfl", "dataset=cifar10", f"data_dir={cifar_subset_dir}", "clients=4",
                      "partition=iid", "split.client_batch=16", "split.sync_every=8", "rounds=4",
                      "ssl.queue_size=256", "ssl.temperature=0.1", "lr_schedule=constant", "eval.every=0",
                      "eval.probe=false", "threads=1")
    out = start(cfg, tmp_path / "sfl", engine="flower")
    losses = [row["loss"] for row in out.metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[1] - 0.1, losses
    assert out.final["knn_acc"] > out.initial["knn_acc"]
    assert all(row["failed"] == row["rejected"] == 0 and row["steps"] == 8 for row in out.metrics)
    activation = 16 * 8 * 32 * 32 * 4  # one client's batch at the cut (the stem: width 8, 32x32), float32
    stacks = torch.load(tmp_path / "sfl" / "checkpoints" / "last.pt", weights_only=True)["method"]["client_online"]
    nets = sum(t[0].numel() * t.element_size() for t in stacks.values())  # one client's online client-net
    for row in out.ledger.rows:
        if row["kind"] == "upload":
            steps = row["steps"]
            assert row["activation_bytes"] == steps * 2 * activation  # query + key of each step
            assert row["weight_bytes"] == 2 * nets  # online + momentum client-net, once per round
            assert row["activation_bytes"] < row["wire_bytes"] < 1.05 * row["bytes"]
        elif row["kind"] == "download":
            assert row["gradient_bytes"] == row["steps"] * activation
    sent_nets = [r["weight_bytes"] for r in out.ledger.rows if r["kind"] == "download"]
    assert all(w == 2 * nets for w in sent_nets)  # the latest averaged nets, with each round's first forward


def test_flower_refuses_what_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *_set_args("method=centralized"), "--engine", "flower", "--out", str(tmp_path / "c")]) == 2
    assert "nothing to federate; run it with --engine local" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["run", "--resume", str(tmp_path), "--engine", "flower"]) == 2
    assert "drop --config/--method/--set/--out/--engine" in capsys.readouterr().err


FLEET = ("devices.mix={fast=0.5,slow=0.5}", "devices.round_deadline_s=60",
         "devices.profiles.fast={memory_mib=4096,gflops=1000,up_mbps=1000,down_mbps=1000,rtt_ms=5,power_w=10}",
         "devices.profiles.slow={memory_mib=4096,gflops=0.001,up_mbps=1,down_mbps=1,rtt_ms=200,availability=0.6}")
CLOCK = ("sim_seconds", "sim_seconds_total", "sim_energy_j", "late", "unavailable")


def test_a_fleet_on_flower_has_the_in_process_clock_deadline_and_budget(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The same simulated clock, late and unreachable clients and per-client energy on Flower as in-process; a
    memory budget refused on Flower as in-process (one line, exit 2, no run directory)."""
    flower = tmp_path / "flower"
    overrides = (*FLOWER_TINY, *FLEET, "clients=4", "eval.probe=false")
    assert main(["run", *_set_args(*overrides), "--engine", "flower", "--out", str(flower), "--quiet"]) == 0
    local = start_run(tiny_config(*overrides), tmp_path / "local")
    rows = read_jsonl(flower / "metrics.jsonl")
    assert _same(rows) == _same(local.metrics)
    assert [{k: r.get(k) for k in CLOCK} for r in rows] == [{k: r.get(k) for k in CLOCK} for r in local.metrics]
    assert sum(r["late"] + r["unavailable"] for r in rows) == 2 * 2  # both slow clients, both rounds
    devices = json.loads((flower / "final.json").read_text())["devices"]
    assert devices == json.loads((tmp_path / "local" / "final.json").read_text())["devices"]
    assert "## Devices and the simulated clock" in (flower / "report.md").read_text()
    capsys.readouterr()
    tinybox = "devices.profiles.tinybox={memory_mib=1,gflops=1,up_mbps=1,down_mbps=1}"
    refused = tmp_path / "refused"
    args = _set_args(*FLOWER_TINY, "devices.mix={tinybox=1.0}", tinybox)
    assert main(["run", *args, "--engine", "flower", "--out", str(refused), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl: error: 2 of 2 clients have profile 'tinybox' with 1 MiB") and err.count("\n") == 1
    assert not refused.exists()
