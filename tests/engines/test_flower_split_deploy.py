"""MocoSFL's per-step exchange on real SuperNodes: a SuperLink and three SuperNodes as processes on 127.0.0.1.

Each step is two messages per client (``train.forward``: its activations up; ``train.backward``: its
gradient slice down), each through the SuperLink, the node's Fleet polling and the node's long-lived
worker (``fedssl deploy supernode``'s default); the client-nets and optimizer buffers stay in each
node's ``context.state``. The loss falls once the queue of negatives is full; the run's report says
how many seconds a step took and where they went. Every process is stopped here, by its PID.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedssl.run_dir import read_jsonl
from tests.engines.test_flower_deploy import (TINY_SET, Processes, fedssl_cli, flwr_run,  # noqa: F401
                                              processes, start_deployment, wait_for)

pytestmark = pytest.mark.slow

SPLIT_SET = ("method=mocosfl; dataset=cifar10; partition=iid; split.client_batch=16; split.sync_every=8; "
             "ssl.queue_size=256; ssl.temperature=0.1; lr_schedule=constant; eval.every=0; eval.probe=false; "
             "threads=1; flower.connect_timeout=90; flower.round_timeout=60")


def test_mocosfl_steps_on_three_real_supernodes(tmp_path: Path, processes: Processes, cifar_subset_dir: Path
                                                ) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    settings = f"{SPLIT_SET}; data_dir={cifar_subset_dir}; clients=3; rounds=3"
    sets = [f"--set={item.strip()}" for item in f"{TINY_SET}; {settings}".split(";")]
    subprocess.run(fedssl_cli("deploy", "partition", *sets, "--out", str(data)), env=processes.env, check=True,
                   capture_output=True)
    start_deployment(processes, data, 3, "split")
    flwr_run(processes, "split", out, settings)
    wait_for(lambda: (out / "report.md").is_file(), 600, "the end of the split run (its report)", processes)

    rows = read_jsonl(out / "metrics.jsonl")
    losses = [row["loss"] for row in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[1] - 0.1, losses
    assert all(row["failed"] == row["rejected"] == 0 and row["steps"] == 8 for row in rows)
    assert json.loads((out / "engine.json").read_text()) == {"engine": "flower", "runtime": "deployment"}
    for row in rows:  # measured seconds per step, and where they went
        assert 0 < row["client_seconds"] < row["forward_seconds"] + row["backward_seconds"] < row["step_seconds"]
    assert "## Seconds per step (measured)" in (out / "report.md").read_text()
    for i in range(3):  # the ClientApps ran in each node's one worker, not a process per message
        log = processes.log(f"node{i}")
        assert "ClientApp tasks of the SuperNode" in log and "Start `flwr-clientapp` process" not in log
