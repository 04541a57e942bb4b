"""A deployment whose SuperLink is killed between rounds and started again: the run resumes from its run directory.

A SuperLink and two SuperNodes as processes on 127.0.0.1 run LW-FedSSL (stage 1: rounds 1-2, stage 2: rounds 3-4).
Once round 3's checkpoint is written the SuperLink (with its ServerApp) is killed (round 4, if already under way, is
lost), and so is node 0's worker; a new SuperLink starts on the same port, the SuperNodes join it again by
themselves as new nodes (``fedssl deploy supernode`` starts Flower's SuperNode again when the SuperLink no
longer knows it), node 0's worker is started again, and ``flwr run . --run-config resume=RUN`` continues the run. The nodes of the new run hold nothing of the old
one, so the server sends them their frozen block again (counted in the ledger); nothing else is lost: every
round's loss and the final encoder's scores are the in-process engine's, uninterrupted, to the bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.engines.local import start_run
from fedssl.run_dir import read_jsonl
from tests.engines.test_flower_deploy import (REPO, TINY_SET, Processes, flwr_run,  # noqa: F401
                                              processes, start_deployment, start_superlink, wait_for,
                                              write_partitions)
from tests.helpers import cmdline, comparable, descendants, tiny_config

pytestmark = pytest.mark.slow

STAGED = "method=lw-fedssl; clients=2; rounds=4; layerwise.rounds_per_stage=2; flower.round_timeout=60"


def worker_pids(procs: Processes, node: str) -> list[int]:
    """The node's long-lived worker process(es), among the SuperNode's descendants."""
    return [pid for pid in descendants(procs.started[node].pid) if "fedssl.engines.flower.worker" in cmdline(pid)]


def resume(procs: Processes, federation: str, out: Path) -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(REPO), federation,
                             "--run-config", f'resume="{out}"'], env=procs.env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "Successfully started run" in result.stdout, result.stdout + result.stderr


def test_a_restarted_superlink_resumes_the_run_and_the_nodes_get_their_frozen_block_again(
        tmp_path: Path, processes: Processes) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    write_partitions(processes, data, clients=2)
    port = start_deployment(processes, data, 2, "restart")
    flwr_run(processes, "restart", out, STAGED)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_jsonl(out / "metrics.jsonl")) == 3, 240,
             "round 3's checkpoint", processes)

    processes.stop("superlink")  # the SuperLink and its ServerApp, after round 3's checkpoint
    old_workers = worker_pids(processes, "node0")
    assert len(old_workers) == 1
    os.kill(old_workers[0], signal.SIGKILL)  # and node 0's worker: its SuperNode starts it again
    assert not (out / "report.md").exists()
    start_superlink(processes, "superlink-again", port)
    resume(processes, "restart", out)
    wait_for(lambda: (out / "report.md").is_file(), 240, "the end of the resumed run (its report)", processes)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["round"], r["failed"], r["rejected"]) for r in rows] == [(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]
    assert "the node's worker exited" in processes.log("node0")
    new_workers = worker_pids(processes, "node0")
    assert len(new_workers) == 1 and new_workers != old_workers
    local = start_run(tiny_config(*(s.strip() for s in f"{TINY_SET}; {STAGED}".split(";"))), tmp_path / "local")
    assert json.loads((out / "final.json").read_text())["final"] == local.final  # nothing lost
    deployed = [{k: v for k, v in row.items() if k not in ("wire_down", "wire_up")} for row in comparable(rows)]
    expected = comparable(local.metrics)
    assert deployed[:3] == expected[:3]
    # round 4 went to nodes of a new run: their frozen block (stage 1) travelled again, and the ledger counts it
    assert {**deployed[3], "bytes_down": 0} == {**expected[3], "bytes_down": 0}
    assert deployed[3]["bytes_down"] > expected[3]["bytes_down"]
    log = (out / "flower.log").read_text()
    assert "resuming" in log and "after round 3/4" in log and log.count("client 0 is node") == 2
    for i in range(2):
        assert "joining it again as a new node" in processes.log(f"node{i}")
