"""LW-FedSSL / Prog-FedSSL: stages, frozen blocks, payloads, late joiners, calibration, alignment, real runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedssl.config import make_config
from fedssl.engines.local import load_federation, start_run
from fedssl.errors import ConfigError
from fedssl.methods import layerwise
from fedssl.methods.base import ClientResult, MethodContext
from fedssl.methods.layerwise import LWFedSSL, ProgFedSSL, StagedFedSSL
from fedssl.resources import payload_bytes
from fedssl.models.staged import encoder_at
from fedssl.stages import StageSchedule
from tests.helpers import tiny_config

VIT = ("threads=1", "model.arch=vit", "model.width=16", "model.depth=3", "model.heads=2", "model.patch_size=8")


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads: None) -> None:
    """Tiny nets: one thread is faster, and the CPU is shared with other jobs."""
    torch.set_num_threads(1)


def vit_config(*overrides: str, method: str = "lw-fedssl"):
    return tiny_config(f"method={method}", *VIT, "rounds=6", "local_steps=1", "batch_size=8", *overrides)


def build(cfg) -> tuple[StagedFedSSL, object]:
    fed = load_federation(cfg, pooled=False)
    cls = LWFedSSL if cfg.method == "lw-fedssl" else ProgFedSSL
    return cls(MethodContext(cfg, fed.train.info, torch.device("cpu"), server_data=fed.server_data())), fed


def run_round(method: StagedFedSSL, fed, r: int, clients: list[int]) -> list[ClientResult]:
    results = []
    for c in clients:
        payload = method.download(r, c)
        results.append(method.client.train(payload, fed.client_data(c), round_index=r, client_id=c))
    method.aggregate(r, results)
    return results


def test_stage_transitions_at_the_right_rounds() -> None:
    cfg = vit_config()
    schedule = StageSchedule.from_config(cfg)  # depth 3 -> 3 stages over 6 rounds
    assert [schedule.stage_index(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [(s.first_active, s.depth) for s in map(schedule.stage, range(3))] == [(0, 2), (2, 3), (3, 4)]
    explicit = StageSchedule.from_config(vit_config("layerwise.schedule=[1,2,3]"))
    assert [explicit.stage_index(r) for r in range(6)] == [0, 1, 1, 2, 2, 2]
    prog = StageSchedule.from_config(vit_config(method="prog-fedssl"), mode="progressive")
    assert [prog.stage(s).first_active for s in range(3)] == [0, 0, 0]
    pairs = StageSchedule.from_config(vit_config("rounds=4", "layerwise.blocks_per_stage=2"))
    assert pairs.stage_ends == (3, 4) and pairs.stage_rounds == (2, 2)
    with pytest.raises(ConfigError, match="set rounds = 9"):
        vit_config("layerwise.rounds_per_stage=3")
    with pytest.raises(ConfigError, match="calibrate on the server; set it to 0"):
        make_config({}, ["calibration.aux_fraction=0.1"])


def test_frozen_blocks_get_no_gradient_and_do_not_change() -> None:
    method, fed = build(vit_config())
    run_round(method, fed, 0, [0, 1, 2])
    run_round(method, fed, 1, [0, 1, 2])
    frozen_before = {k: v.clone() for k, v in method.global_model.encoder.backbone.layers[:2].state_dict().items()}
    active_before = {k: v.clone() for k, v in method.global_model.encoder.backbone.layers[2].state_dict().items()}
    payload = method.download(2, 0)  # stage 2: layers 0, 1 frozen, layer 2 active
    method.client.train(payload, fed.client_data(0), round_index=2, client_id=0)
    worker = method.client.worker.encoder.backbone
    for name, p in worker.layers[:2].named_parameters():
        assert p.grad is None and not p.requires_grad, name
        assert torch.equal(p, frozen_before[name]), name
    assert any(not torch.equal(p, active_before[n]) for n, p in worker.layers[2].named_parameters())
    trainable = {id(p) for p in method.client.worker.trainable_parameters()}
    assert not trainable & {id(p) for p in worker.layers[:2].parameters()}
    assert not trainable & {id(p) for p in worker.layers[3].parameters()}  # not built yet


def test_only_the_active_block_and_heads_travel_and_late_joiners_pay_for_frozen_blocks() -> None:
    method, fed = build(vit_config())
    run_round(method, fed, 0, [0, 1])  # client 2 sits the first stage out
    run_round(method, fed, 1, [0, 1])
    regular = method.download(2, 0)
    prefixes = {k.split(".")[0] + ("." + ".".join(k.split(".")[1:4]) if k.startswith("encoder.") else "")
                for k in regular}
    # stage 1 begins: the newly frozen stem + block 1 are sent once in their final version, with block 2 + heads
    assert {p for p in prefixes if p.startswith("encoder.")} == {
        "encoder.backbone.layers.0", "encoder.backbone.layers.1", "encoder.backbone.layers.2", "encoder.backbone.norm.weight",
        "encoder.backbone.norm.bias"}
    assert not any(k.startswith(("momentum", "encoder.backbone.layers.3.", "encoder.adapters.0."))
                   for k in regular)
    again = method.download(2, 0)  # the same client again: the frozen block is not re-sent
    assert set(again) == set(method.global_model.exchanged_state())
    late = method.download(2, 2)  # never downloaded: every frozen layer (stem + block 1)
    frozen = method.global_model.encoder.backbone.layers[:2].state_dict()
    assert set(late) - set(again) == {f"encoder.backbone.layers.{k}" for k in frozen}
    assert payload_bytes(late) - payload_bytes(again) == payload_bytes(frozen)
    result = method.client.train(late, fed.client_data(2), round_index=2, client_id=2)
    assert set(result.upload) == set(method.global_model.exchanged_state())  # upload: active part + heads only


def test_prog_fedssl_trains_and_sends_every_block_so_far() -> None:
    method, fed = build(vit_config(method="prog-fedssl"))
    run_round(method, fed, 0, [0, 1, 2])
    run_round(method, fed, 1, [0, 1, 2])
    payload = method.download(2, 0)
    layers = {int(k.split(".")[3]) for k in payload if k.startswith("encoder.backbone.layers.")}
    assert layers == {0, 1, 2}
    method.client.receive(payload, 2, 0)  # the client at round 2's stage
    assert all(p.requires_grad for p in method.client.worker.encoder.backbone.layers[:3].parameters())


def test_calibration_uses_only_the_auxiliary_set(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = vit_config("calibration.aux_fraction=0.2", "calibration.steps=2")
    method, fed = build(cfg)
    clients = set().union(*(set(ix.tolist()) for ix in fed.client_indices))
    server = set(fed.server_indices.tolist())
    assert len(server) == round(0.2 * len(fed.train)) and not server & clients
    assert server | clients == set(range(len(fed.train)))
    seen = []
    real = layerwise.train_local

    def spy(model, data, *args, **kwargs):
        seen.append(data)
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(layerwise, "train_local", spy)
    before = {k: v.clone() for k, v in method.global_model.encoder.backbone.layers[0].state_dict().items()}
    run_round(method, fed, 0, [0])
    assert len(seen) == 1 and seen[0] is method.ctx.server_data  # the server trains on its own set only
    assert method.last_calibration is not None and method.last_calibration.steps == 2
    assert any(not torch.equal(v, before[k]) for k, v in method.global_model.encoder.backbone.layers[0].state_dict().items())


def test_alignment_term_is_zero_when_local_equals_global() -> None:
    method, fed = build(vit_config("alignment.weight=1.0"))
    payload = method.download(0, 0)
    method.client.receive(payload, 0, 0)
    views = torch.randn(4, 3, 32, 32)
    method.client.worker.eval()
    assert float(method.client.worker.alignment_term(views).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        method.client.worker.encoder.backbone.layers[1].linear1.weight.add_(torch.randn(64, 16))
    assert float(method.client.worker.alignment_term(views).detach()) > 1e-4
    mse = build(vit_config("alignment.weight=1.0", "alignment.distance=mse"))[0]
    mse.client.receive(mse.download(0, 0), 0, 0)
    assert float(mse.client.worker.alignment_term(views).detach()) == 0.0


def test_resnet_stages_have_adapters_that_travel_with_their_stage() -> None:
    cfg = tiny_config("method=lw-fedssl", "rounds=4", "local_steps=1", "batch_size=8")
    method, fed = build(cfg)
    adapters = method.global_model.encoder.adapters
    assert [type(a).__name__ for a in adapters] == ["Linear", "Linear", "Linear", "Identity"]
    run_round(method, fed, 0, [0, 1, 2])
    payload = method.download(1, 0)
    assert any(k.startswith("encoder.adapters.1.") for k in payload)
    assert not any(k.startswith("encoder.adapters.0.") for k in payload)
    assert method.encoder()(torch.randn(2, 3, 32, 32)).shape == (2, 16)  # stage 2's width, pooled
    assert encoder_at(method.backbone, 5) is method.backbone


@pytest.mark.parametrize("method", ["lw-fedssl", "prog-fedssl"])
def test_short_real_run(tmp_path: Path, method: str) -> None:
    extra = ("calibration.aux_fraction=0.1", "calibration.steps=1", "alignment.weight=0.5") \
        if method == "lw-fedssl" else ("sample_fraction=0.5", "dropout=0.3")
    cfg = vit_config(*extra, "rounds=3", "eval.probe_epochs=2", "eval.every=0", method=method)
    out = start_run(cfg, tmp_path / method)
    assert len(out.metrics) == 3 and all(m["loss"] == m["loss"] for m in out.metrics if m["images"])
    assert out.final["feature_dim"] == 16 and out.ledger.summary()["peak_training_bytes_max"] > 0


def test_state_dict_resumes_exactly() -> None:
    cfg = vit_config("calibration.aux_fraction=0.1", "calibration.steps=1", "alignment.weight=0.5")
    a, fed = build(cfg)
    for r in range(3):
        run_round(a, fed, r, [0, 1] if r < 2 else [1, 2])
    b, _ = build(cfg)
    b.load_state_dict(a.state_dict())
    assert b.encoder().num_layers() == a.encoder().num_layers() == 3  # stage 1: stem + 2 blocks
    assert set(b.download(3, 0)) == set(a.download(3, 0))  # the same frozen blocks owed to the same client
    for m in (a, b):
        m.client_lost(0)  # those two downloads never reached the client
        run_round(m, fed, 4, [0, 2])
    for (k, va), vb in zip(a.global_model.state_dict().items(), b.global_model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_measured_client_cost_understates_neither_memory_nor_flops() -> None:
    method, fed = build(vit_config("model.depth=8", "rounds=8"))
    data = fed.client_data(0)
    first, last = (method.measure_stage(data, method.schedule.stage(s)) for s in (0, 7))
    assert last.flops_per_image > first.flops_per_image  # the last stage also runs seven frozen blocks
    cost = method.measure_client_step(data)
    assert cost.flops_per_image == max(first.flops_per_image, last.flops_per_image)
    assert cost.peak_training_bytes == pytest.approx(max(first.peak_training_bytes, last.peak_training_bytes),
                                                     rel=0.05)
