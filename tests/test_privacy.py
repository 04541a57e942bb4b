"""Client-level differential privacy (``[privacy]``, DP-FedAvg): the clip bound holds for every client, the noise
has the configured scale, the accountant gives the library's figures, bad settings are refused with one line,
and a DP run killed and resumed ends exactly like an uninterrupted one (in-process and on Flower's simulation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedssl.cli import EXIT_USER_ERROR, main
from fedssl.config import dumps_toml, to_dict
from fedssl.data.datasets import DATASETS
from fedssl.engines.local import load_federation, start_run
from fedssl.methods import METHODS
from fedssl.methods.base import ClientResult, MethodContext
from fedssl.methods.fedavg import FedMoCo
from fedssl.privacy import accountant
from fedssl.privacy.dp import clients_per_round, clip_upload, global_norm, noised_sum, update_of
from fedssl.run_dir import read_jsonl
from tests.helpers import assert_resume_is_exact, tiny_args, tiny_config

DP = ("privacy.enabled=true", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.8", "clients=4",
      "sample_fraction=0.5", "eval.probe=false")


def _state(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(64, 32, generator=g), "b": scale * torch.randn(32, generator=g),
            "count": torch.tensor(7)}


def test_clipping_bounds_every_clients_contribution() -> None:
    """Client side: the update sent has norm <= C (integer tensors untouched, a small update sent as it is);
    server side: whatever a client sends (here an unclipped update 100x the bound), its share of the sum is <= C."""
    download = _state(0, 1.0)
    big = {k: (v + _state(1, 1.0)[k] if v.is_floating_point() else v + 5) for k, v in download.items()}
    clipped, was = clip_upload(big, download, 0.5)
    assert was and global_norm(update_of(clipped, download)) <= 0.5 * (1 + 1e-6)
    assert int(clipped["count"]) == 12  # sent as it is; the server never averages it in
    small = {k: (v + 1e-4 if v.is_floating_point() else v) for k, v in download.items()}
    assert clip_upload(small, download, 0.5) == (small, False)
    for upload in (big, clipped, small):  # each client's contribution to the server's sum, noise off
        share = noised_sum(download, [upload], 0.5, 0.0, torch.Generator())
        assert global_norm(share) <= 0.5 * (1 + 1e-12)
    assert global_norm(noised_sum(download, [big, big, big], 0.5, 0.0, torch.Generator())) <= 1.5 * (1 + 1e-12)


@pytest.mark.parametrize("method", ["fedmoco", "lw-fedssl"])
def test_a_real_client_uploads_its_update_clipped(method: str) -> None:
    """A real client's local round: what it sends differs from what it got by at most the bound. LW-FedSSL in its
    second stage: the download also holds the frozen first stage, which is never sent back."""
    cfg = tiny_config(*DP, f"method={method}", "rounds=2", "model.blocks_per_stage=[1,1]", "privacy.clip_norm=0.005",
                      threads=1)
    fed = load_federation(cfg, pooled=False)
    server = METHODS[method](MethodContext(cfg, fed.train.info, torch.device("cpu")))
    last = cfg.rounds - 1
    download = server.download(last, 1)
    result = server.client.train(download, fed.client_data(1), round_index=last, client_id=1)
    assert result.metrics["clipped"] == 1.0  # two local steps move the weights by more than 0.005
    assert global_norm(update_of(result.upload, download)) <= 0.005 * (1 + 1e-5)  # float32 rounding of the sum
    assert set(result.upload) < set(download) if method == "lw-fedssl" else set(result.upload) == set(download)


def test_the_noise_has_the_configured_scale() -> None:
    """Every sampled client sends back what it got (a zero update): the new global model minus the old one is the
    noise alone, N(0, (z C / m)^2) per coordinate, m = the clients a round samples. Fixed seed; ~80k draws give the
    std to about 0.25%, the mean to about 0.004 std."""
    cfg = tiny_config(*DP, "privacy.clip_norm=2.0", "privacy.noise_multiplier=0.7", "privacy.reproducible_noise=true")
    info = DATASETS["synthetic"]
    method = FedMoCo(MethodContext(cfg, info, torch.device("cpu")))
    before = {k: v.clone() for k, v in method.global_model.exchanged_state().items()}
    replies = [ClientResult(c, {k: v.clone() for k, v in before.items()}, 10, {"steps": 1}) for c in (0, 2)]
    method.aggregate(0, replies)
    noise = torch.cat([(v.double() - before[k].double()).flatten()
                       for k, v in method.global_model.exchanged_state().items() if v.is_floating_point()])
    m = clients_per_round(cfg.sample_fraction, cfg.clients)
    std = 0.7 * 2.0 / m
    assert m == 2 and noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())
    assert float((noise.abs() < std).double().mean()) == pytest.approx(0.6827, abs=0.005)  # Gaussian, not uniform
    assert not any(v.is_floating_point() is False and not torch.equal(v, before[k])
                   for k, v in method.global_model.exchanged_state().items())


def test_the_accountant_gives_the_librarys_documented_figures() -> None:
    """dp-accounting's own test: a Gaussian of noise multiplier 4.530877117 is exactly (1, 1e-6)-DP (orders 1 to
    100 by 0.001). All clients every round (q = 1) and our z / 2 (replace-one) give that Gaussian."""
    orders = [0.001 * i for i in range(1000, 100000)]
    eps = accountant.epsilon(2 * 4.530877117, 1e-6, rounds=1, sample_size=10, population=10, orders=orders)
    assert eps == pytest.approx(1.0, abs=1e-6)


def test_the_accountant_agrees_with_flowers_and_behaves() -> None:
    """Flower's own wrapper of the same library (sampling without replacement, replace-one) gives the same epsilon
    for 10 of 100 clients over 50 rounds; more rounds cost more, more noise and a smaller sample less."""
    from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant,
                                SamplingMethod)

    flower = RdpAccountant(PrivacyConfig(1e-5, 100, NeighboringRelation.REPLACE_ONE,
                                         SamplingMethod.WITHOUT_REPLACEMENT))
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.2 / 2, sample_size=10, population_size=100), count=50)
    ours = accountant.epsilon(1.2, 1e-5, rounds=50, sample_size=10, population=100)
    assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)
    assert accountant.epsilon(1.2, 1e-5, 100, 10, 100) > ours > accountant.epsilon(1.2, 1e-5, 25, 10, 100)
    assert accountant.epsilon(2.4, 1e-5, 50, 10, 100) < ours < accountant.epsilon(1.2, 1e-5, 50, 20, 100)
    assert accountant.epsilon(0.0, 1e-5, 50, 10, 100) == math.inf and accountant.epsilon(1.2, 1e-5, 0, 10, 100) == 0


def test_sampling_more_clients_never_reports_a_smaller_guarantee_than_all_of_them() -> None:
    """The without-replacement bound alone gives 9 of 10 clients a LARGER epsilon than 10 of 10 (46.1 against 41.6
    at z = 1 over 8 rounds); the plain Gaussian bound holds for any sample, so the reported epsilon is the smaller."""
    every = accountant.epsilon(1.0, 1e-5, 8, 10, 10)
    sampled_alone = accountant._composed_epsilon(accountant.round_event(1.0, 9, 10), 8, 1e-5, None)
    assert sampled_alone > every  # what the accountant reported before
    epsilons = [accountant.epsilon(1.0, 1e-5, 8, m, 10) for m in range(1, 11)]
    assert epsilons == sorted(epsilons) and epsilons[8] == pytest.approx(every)  # more clients: never less private
    assert epsilons[0] < every / 2  # where sampling helps (1 of 10: 16.0), it still counts


@pytest.mark.parametrize(("setting", "fragment"), [
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.delta=1"], "privacy.delta"),
    (["privacy.enabled=true", "method=mocosfl"], "split learning"),
    (["privacy.enabled=true", "method=centralized"], "pooled data"),
    (["privacy.enabled=true", "model.norm=batch"], "model.norm"),
    (["privacy.enabled=true", "flower.secagg=true"], "cannot be combined"),
])
def test_bad_privacy_settings_get_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      setting: list[str], fragment: str) -> None:
    out = tmp_path / "never"
    assert main(["run", *tiny_args(*[f"--set={s}" for s in setting]), "--out", str(out)]) == EXIT_USER_ERROR == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedssl: error: ") and "\n" not in err and fragment in err, err
    assert not out.exists()


def test_the_noise_key_is_a_server_secret_kept_in_the_checkpoint() -> None:
    """Without reproducible_noise the key comes from the OS (two runs differ), never from the config; a method
    restored from a state dict holds it again (what makes the resume of such a run exact)."""
    cfg = tiny_config(*DP)
    info = DATASETS["synthetic"]
    one, two = (FedMoCo(MethodContext(cfg, info, torch.device("cpu"))) for _ in range(2))
    assert one.noise_key != two.noise_key and str(one.noise_key) not in dumps_toml(to_dict(cfg))
    two.load_state_dict(one.state_dict())
    assert two.noise_key == one.noise_key


def test_a_dp_run_killed_and_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = tiny_config(*DP, "privacy.reproducible_noise=true", "privacy.clip_norm=0.002", "rounds=3", "local_steps=1",
                      threads=1)
    assert assert_resume_is_exact(cfg, tmp_path) >= 1
    rows = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["epsilon"] for r in rows] == [accountant.run_epsilon(cfg, r) for r in (1, 2, 3)]
    assert all(r["clipped"] == 2 for r in rows)  # both sampled clients hit the bound every round
    final = json.loads((tmp_path / "killed" / "final.json").read_text())["privacy"]
    assert final["epsilon"] == rows[-1]["epsilon"] and final["clients_per_round"] == 2
    assert "Privacy: client-level DP-FedAvg" in (tmp_path / "killed" / "report.md").read_text()


@pytest.mark.slow
def test_dp_on_flowers_simulation_equals_the_in_process_engine(tmp_path: Path) -> None:
    """The ClientApps clip (it is the client role's code), the ServerApp adds the same noise: the metrics, epsilon
    included, and the final encoder of the in-process run."""
    settings = (*DP, "privacy.reproducible_noise=true", "privacy.clip_norm=0.002", "threads=1", "rounds=2", "local_steps=1", "batch_size=8",
                "model.blocks_per_stage=[1,1]")
    flower = tmp_path / "flower"
    assert main(["run", *tiny_args(*[f"--set={s}" for s in settings]), "--engine", "flower", "--out", str(flower),
                 "--quiet"]) == 0
    local = start_run(tiny_config(*settings), tmp_path / "local")
    keys = ("round", "loss", "clients", "knn_acc", "epsilon", "clipped", "bytes_up")
    assert [{k: r[k] for k in keys} for r in read_jsonl(flower / "metrics.jsonl")] == \
        [{k: r[k] for k in keys} for r in local.metrics]
    assert all(r["clipped"] == 2 for r in local.metrics)
    assert json.loads((flower / "final.json").read_text())["final"] == local.final
