"""Secure aggregation (``flower.secagg``): Flower's SecAgg+ in a round of a round-based method.

On Flower's simulation runtime (the ServerApp in this process, each ClientApp in a Ray worker process: the same
messages, workflow stages and client mod as a deployment): the aggregate equals the in-process engine's plain
FedAvg of the same uploads within the protocol's quantisation, while no reply that reached the server held a
model array and nothing that reached ``aggregate`` was one client's upload. On a real deployment (a SuperLink and
three SuperNodes as processes, ``flwr run .``) with one node whose upload is NaN: that node withholds it, the
protocol unmasks the other two, and the model the server kept is their plain FedAvg within the quantisation.
The settings no engine or method can honour are refused with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedssl.aggregation import weighted_average
from fedssl.cli import main
from fedssl.config_schema import SECAGG_LEVELS
from fedssl.engines import start
from fedssl.engines.local import start_run
from fedssl.errors import ConfigError
from fedssl.methods.base import ClientResult
from fedssl.methods.fedavg import FedAvgSSL
from fedssl.run_dir import read_jsonl
from tests.engines.test_flower_deploy import (TINY_SET, Processes, flwr_run,  # noqa: F401 (fixture)
                                              processes, start_three_nodes_one_nan, wait_for)
from tests.helpers import tiny_config

SECAGG_TINY = ("threads=1", "clients=3", "rounds=1", "local_steps=1", "batch_size=8", "eval.probe_epochs=1",
               "model.blocks_per_stage=[1,1]")


def _bound(cfg, uploads: list[ClientResult]) -> float:  # type: ignore[no-untyped-def]
    """How far SecAgg+'s mean may be from the plain one: each client's weighted change is off by less than one
    quantisation step (2 * clip / levels); the sum is divided by the sum of the weights (n / largest n)."""
    weights = [r.num_samples / max(u.num_samples for u in uploads) for r in uploads]
    return len(uploads) * (2 * cfg.flower.secagg_clip / SECAGG_LEVELS) / sum(weights) + 1e-6


def _error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - want[k]).abs().max()) for k, v in want.items() if torch.is_floating_point(v))


def _spy_aggregate(monkeypatch: pytest.MonkeyPatch) -> list[list[ClientResult]]:
    """Every list of results that reaches a FedAvg-family method's aggregate (copied)."""
    seen: list[list[ClientResult]] = []
    original = FedAvgSSL.aggregate

    def aggregate(self: FedAvgSSL, round_index: int, results: list[ClientResult]) -> None:
        seen.append([ClientResult(r.client_id, {k: v.clone() for k, v in r.upload.items()}, r.num_samples,
                                  dict(r.metrics)) for r in results])
        original(self, round_index, results)

    monkeypatch.setattr(FedAvgSSL, "aggregate", aggregate)
    return seen


@pytest.mark.slow
def test_secagg_deployment_sums_the_other_clients_when_one_withholds_nan(tmp_path: Path, processes: Processes,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    start_three_nodes_one_nan(processes, tmp_path / "data")
    flwr_run(processes, "local-deployment", out, "clients=3; rounds=1; flower.secagg=true; flower.round_timeout=90")
    wait_for(lambda: (out / "report.md").is_file(), 300, "the end of the run (its report)", processes)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["clients"], r["failed"], r["rejected"]) for r in rows] == [(3, 1, 0)]
    log = (out / "flower.log").read_text()
    assert "round 1: client 2 failed (its ClientApp failed:" in log and "NaN or inf; withheld" in log
    seen = _spy_aggregate(monkeypatch)
    cfg = tiny_config(*(item.strip() for item in TINY_SET.split(";")), "clients=3", "rounds=1")
    start_run(cfg, tmp_path / "local")
    (uploads,) = seen
    two = [r for r in uploads if r.client_id != 2]
    plain = weighted_average([r.upload for r in two], [r.num_samples for r in two])
    kept = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["method"]["global_model"]
    bound = _bound(cfg, two)
    assert _error(kept, plain) <= bound, (_error(kept, plain), bound)
    assert _error(kept, weighted_average([r.upload for r in uploads], [r.num_samples for r in uploads])) > 10 * bound


def _spy_replies(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every message the server's Grid handed to the server."""
    pulled: list = []
    original = InMemoryGrid.pull_messages

    def pull_messages(self: InMemoryGrid, message_ids):  # type: ignore[no-untyped-def]
        replies = list(original(self, message_ids))
        pulled.extend(replies)
        return replies

    monkeypatch.setattr(InMemoryGrid, "pull_messages", pull_messages)
    return pulled


@pytest.mark.slow  # Ray and two tiny runs: about a minute on 2 busy cores
def test_secagg_sums_like_fedavg_and_the_server_never_holds_an_upload(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen, pulled = _spy_aggregate(monkeypatch), _spy_replies(monkeypatch)
    start_run(tiny_config(*SECAGG_TINY), tmp_path / "local")
    uploads = seen.pop()  # the in-process engine: each client's own upload
    plain = weighted_average([r.upload for r in uploads], [r.num_samples for r in uploads])

    cfg = tiny_config(*SECAGG_TINY, "flower.secagg=true")
    start(cfg, tmp_path / "secagg", engine="flower")
    (results,) = seen  # one round
    assert [r.client_id for r in results] == [0, 1, 2]
    assert [r.num_samples for r in results] == [r.num_samples for r in uploads]
    secure = results[0].upload
    assert all(r.upload.keys() == secure.keys() and all(torch.equal(r.upload[k], secure[k]) for k in secure)
               for r in results)  # each result carries the one aggregate, never its client's upload

    bound = _bound(cfg, uploads)
    assert _error(secure, plain) <= bound, (_error(secure, plain), bound)
    assert all(_error(secure, own.upload) > 100 * bound for own in uploads)  # ... far from every client's upload

    train = [m for m in pulled if m.metadata.message_type == "train" and not m.has_error()]
    assert len(train) == 3 * 4  # three clients, four SecAgg+ stages
    assert all(len(record) == 0 for m in train for record in m.content.array_records.values())
    masked = [m for m in train if "masked_params" in m.content.config_records["secaggplus_configs"]]
    assert len(masked) == 3
    rows = read_jsonl(tmp_path / "secagg" / "metrics.jsonl")
    assert [(r["clients"], r["failed"], r["rejected"]) for r in rows] == [(3, 0, 0)]
    assert rows[0]["wire_up"] > 0


def test_secagg_is_refused_where_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="mocosfl exchanges activations every step"):
        tiny_config("method=mocosfl", "flower.secagg=true")
    with pytest.raises(ConfigError, match="samples 1"):
        tiny_config("clients=1", "flower.secagg=true")
    code = main(["run", "--set=dataset=synthetic", "--set=flower.secagg=true", "--out", str(tmp_path / "r"),
                 "--quiet"])
    assert code == 2
    assert "the in-process engine does not send" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
