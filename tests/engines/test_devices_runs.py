"""Runs on a fleet (in-process engine): the memory budget refused by the CLI, late and unreachable clients counted
and exact on resume, the metrics' simulated seconds those of the clock recomputed by hand from the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedssl.cli import main
from fedssl.engines.local import start_run
from fedssl.engines.steps import round_members
from fedssl.report import regenerate_report
from fedssl.resources import STEP_COST
from fedssl.run_dir import read_jsonl
from tests.helpers import assert_resume_is_exact, tiny_args, tiny_config

FAST = "{memory_mib=4096,gflops=1000,up_mbps=1000,down_mbps=1000,rtt_ms=5,power_w=10}"
SLOW = "{memory_mib=4096,gflops=0.001,up_mbps=1,down_mbps=1,rtt_ms=200,availability=0.6}"
FLEET = ("devices.mix={fast=0.5,slow=0.5}", f"devices.profiles.fast={FAST}", f"devices.profiles.slow={SLOW}")


def test_a_client_over_its_memory_budget_is_refused_before_training(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    tinybox = "--set=devices.profiles.tinybox={memory_mib=1,gflops=1,up_mbps=1,down_mbps=1}"
    assert main(["run", *tiny_args("--set=devices.mix={tinybox=1.0}", tinybox), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl: error: 3 of 3 clients have profile 'tinybox' with 1 MiB, but fedmoco's measured "
                          "client step needs ")
    assert "at batch_size=16); fits: " in err and "(--method lw-fedssl)" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # refused before training: no run directory left behind


def test_split_budget_names_the_client_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tinybox = "--set=devices.profiles.tinybox={memory_mib=0.01,gflops=1,up_mbps=1,down_mbps=1}"
    assert main(["run", *tiny_args("--set=method=mocosfl", "--set=devices.mix={tinybox=1.0}", tinybox),
                 "--out", str(tmp_path / "sfl")]) == 2
    err = capsys.readouterr().err
    assert "mocosfl's measured client step needs" in err and "at split.client_batch=1)" in err
    assert not (tmp_path / "sfl").exists()


def _hand_round_seconds(profiles: dict, rows: list[dict], round_index: int, names: tuple[str, ...],
                        flops: float) -> float:
    """The round's simulated seconds written out: the slowest client's RTT + down + compute + up (no deadline)."""
    down = {r["client"]: r for r in rows if r["round"] == round_index and r["kind"] == "download"}
    up = {r["client"]: r for r in rows if r["round"] == round_index and r["kind"] == "upload"}
    seconds = []
    for client, row in up.items():
        p = profiles[names[client]]
        seconds.append(p["rtt_ms"] / 1000 + down[client]["bytes"] * 8 / (p["down_mbps"] * 1e6)
                       + flops * row["images"] / (p["gflops"] * 1e9) + row["bytes"] * 8 / (p["up_mbps"] * 1e6))
    return max(seconds)


def test_deadline_drops_late_clients_and_resume_is_exact(tmp_path: Path) -> None:
    """Slow clients take minutes a round on their profile: with a 60 s deadline they are late (trained, upload never
    sent, not averaged); some are unreachable (availability 0.6). Killed after round 1 and resumed: the same files."""
    cfg = tiny_config(*FLEET, "devices.round_deadline_s=60", "clients=4", "rounds=3", "eval.probe=false",
                      "eval.every=0", "threads=1")
    out = start_run(cfg, tmp_path / "run")
    devices = json.loads((tmp_path / "run" / "final.json").read_text())["devices"]
    slow = [c["client"] for c in devices["clients"] if c["profile"] == "slow"]
    assert len(slow) == 2
    late = sum(m["late"] for m in out.metrics)
    unavailable = sum(m["unavailable"] for m in out.metrics)
    assert late + unavailable == 2 * 3 and late >= 1 and unavailable >= 1  # every slow client, every round
    for m in out.metrics:  # a round with a late client waits for the deadline; the others end earlier
        assert m["sim_seconds"] == 60.0 if m["late"] else m["sim_seconds"] < 60.0
    rows = out.ledger.rows
    late_rows = [r for r in rows if r.get("late")]
    assert len(late_rows) == late and all(r["client"] in slow and r["kind"] == "download" for r in late_rows)
    assert not any(r["kind"] == "upload" and r["client"] in slow for r in rows)  # their uploads never sent
    assert math.isclose(out.metrics[-1]["sim_seconds_total"], sum(m["sim_seconds"] for m in out.metrics))
    assert all(c["late_rounds"] == sum(r["client"] == c["client"] for r in late_rows) for c in devices["clients"])
    assert all(("energy_j" in c) == (c["profile"] == "fast") for c in devices["clients"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Devices and the simulated clock" in report and "| client | profile | images |" in report
    (tmp_path / "resume").mkdir()
    assert assert_resume_is_exact(cfg, tmp_path / "resume") >= 1


def test_layerwise_clock_is_the_hand_formula_on_its_ledger(tmp_path: Path) -> None:
    """4 stages of one round each: every stage's client step is measured at its first round and clocks its rounds."""
    cfg = tiny_config("method=lw-fedssl", "model.arch=resnet", "rounds=4", "devices.mix={rpi4=0.5,laptop-cpu=0.5}",
                      "eval.probe=false", "eval.every=0", "threads=1", "clients=4")
    out = start_run(cfg, tmp_path / "lw")
    final = json.loads((tmp_path / "lw" / "final.json").read_text())["devices"]
    names = tuple(c["profile"] for c in final["clients"])
    costs = [(r["round"], r["flops_per_image"]) for r in out.ledger.rows if r["kind"] == STEP_COST]
    assert [r for r, _ in costs] == [0, 0, 1, 2, 3]  # the run's step (its costliest stage), then each stage's own
    assert costs[1][1] < costs[0][1] == costs[-1][1]  # the first stage computes less than the last
    for r, m in enumerate(out.metrics):
        flops = [f for at, f in costs if at <= r][-1]  # the step of the round's stage
        expected = _hand_round_seconds(final["profiles"], out.ledger.rows, r, names, flops)
        assert math.isclose(m["sim_seconds"], expected, rel_tol=1e-12), (r, m["sim_seconds"], expected)
        assert "late" in m and m["late"] == 0
    (tmp_path / "lw" / "report.md").unlink()
    regenerate_report(tmp_path / "lw")  # `fedssl report RUN`: the fleet's section from the run's own files
    assert "## Devices and the simulated clock" in (tmp_path / "lw" / "report.md").read_text()
    assert (tmp_path / "lw" / "plots" / "knn_time.png").is_file()


def test_mocosfl_round_on_a_fleet(tmp_path: Path) -> None:
    """Every step waits for its slowest client and the server's step; the clock agrees with the round's members."""
    cfg = tiny_config("method=mocosfl", "devices.mix={rpi4=0.5,phone=0.5}", "split.sync_every=4",
                      "split.clients_per_step=0.67", "eval.probe=false", "eval.every=0", "threads=1")
    out = start_run(cfg, tmp_path / "sfl")
    metrics = read_jsonl(tmp_path / "sfl" / "metrics.jsonl")
    assert all(m["sim_seconds"] > 0 and "unavailable" in m for m in metrics)
    uploads = [r for r in out.ledger.rows if r["kind"] == "upload"]
    assert all(r["images"] == r["samples"] for r in uploads)
    for r in range(cfg.rounds):
        members = round_members(cfg, cfg.split, r, cfg.clients)
        served = {row["client"]: row["steps"] for row in uploads if row["round"] == r}
        for client, steps in served.items():
            assert steps == sum(int(client in m.tolist()) for m in members)


def test_mocosfl_deadline_sits_slow_clients_out(tmp_path: Path) -> None:
    """A slow client's own part of a split round (its steps and the sync) exceeds the deadline: it sits the round
    out (no step, no bytes, counted late); the round is the fast clients' steps. Exact on resume."""
    cfg = tiny_config("method=mocosfl", *FLEET, "devices.round_deadline_s=1", "clients=4", "split.sync_every=3",
                      "eval.probe=false", "eval.every=0", "threads=1")
    out = start_run(cfg, tmp_path / "sfl")
    devices = json.loads((tmp_path / "sfl" / "final.json").read_text())["devices"]
    slow = {c["client"] for c in devices["clients"] if c["profile"] == "slow"}
    late_rows = [r for r in out.ledger.rows if r.get("late")]
    assert {r["client"] for r in late_rows} <= slow and len(late_rows) == sum(m["late"] for m in out.metrics) >= 1
    assert all(r["bytes"] == 0 and r["kind"] == "download" for r in late_rows)
    late = {(r["round"], r["client"]) for r in late_rows}
    assert not any((r["round"], r["client"]) in late for r in out.ledger.rows if r["kind"] == "upload")
    assert all(0 < m["sim_seconds"] < 1 for m in out.metrics)
    (tmp_path / "resume").mkdir()
    assert assert_resume_is_exact(cfg, tmp_path / "resume") >= 1
