"""A real Flower deployment on this machine: a SuperLink and SuperNodes as separate processes, ``flwr run .``.

Insecure first, with faults: three SuperNodes, each reading only its own data folder; one uploads NaN (node
config ``fault``), one is killed in the middle of round 2: the run finishes, the report counts both. Then TLS
with SuperNode authentication: a node with an unregistered key is refused; a run over TLS completes with the
in-process engine's metrics. Every process started here is stopped here (process group + descendants).

Each SuperNode runs its ClientApps in its long-lived worker (``fedssl deploy supernode``'s default); a killed
SuperNode takes its worker with it (one process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedssl.engines.flower.deploy import flower_env
from fedssl.engines.local import start_run
from fedssl.run_dir import read_jsonl
from tests.helpers import cmdline, descendants, tiny_config

REPO = Path(__file__).resolve().parents[2]
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-clientapp", "flwr-serverapp")
TINY_SET = ("dataset=synthetic; partition=iid; local_steps=1; batch_size=8; model.width=8; "
            "model.blocks_per_stage=[1,1]; ssl.proj_hidden=32; ssl.proj_dim=16; ssl.queue_size=64; "
            "eval.probe_epochs=1; eval.knn_k=20; threads=1; flower.connect_timeout=90")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Processes started for a test; ``stop_all`` ends each with its process group and descendants."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.logs,
                                start_new_session=True)
        log.close()
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        proc = self.started[name]
        family = [proc.pid, *descendants(proc.pid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)
        time.sleep(0.5)
        left = [pid for proc in self.started.values() for pid in [proc.pid, *descendants(proc.pid)]
                if Path(f"/proc/{pid}").exists() and "<defunct>" not in cmdline(pid)]
        assert not left, f"processes left running: {[cmdline(p) for p in left]}"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {**flower_env(), "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONUNBUFFERED": "1"}
    procs = Processes(env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def fedssl_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedssl.cli", *args]


def wait_for(predicate, timeout: float, what: str, procs: Processes | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    logs = "" if procs is None else "\n".join(f"--- {n}\n{procs.log(n)[-2000:]}" for n in procs.started)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def write_partitions(procs: Processes, folder: Path, clients: int) -> None:
    sets = [f"--set={item.strip()}" for item in TINY_SET.split(";")] + [f"--set=clients={clients}"]
    subprocess.run(fedssl_cli("deploy", "partition", *sets, "--out", str(folder)), env=procs.env, check=True,
                   capture_output=True)


def flwr_run(procs: Processes, federation: str, out: Path, settings: str) -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(REPO), federation,
                             "--run-config", f"set='{TINY_SET}; {settings}' out=\"{out}\""],
                            env=procs.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Successfully started run" in result.stdout, result.stdout + result.stderr


def start_superlink(procs: Processes, name: str, port: int) -> None:
    procs.start(name, fedssl_cli("deploy", "superlink", "--host", "127.0.0.1", "--port", str(port)))
    wait_for(lambda: listening(port), 60, f"the SuperLink ({name})", procs)


def start_deployment(procs: Processes, data: Path, nodes: int, federation: str,
                     node_args: dict[int, list[str]] | None = None) -> int:
    """A SuperLink and ``nodes`` SuperNodes (node i reading ``data/partition-i``, with ``node_args[i]``) as
    processes on 127.0.0.1, registered as ``federation``; returns the SuperLink's port."""
    port = free_port()
    start_superlink(procs, "superlink", port)
    for i in range(nodes):
        procs.start(f"node{i}", fedssl_cli(
            "deploy", "supernode", "--superlink", f"127.0.0.1:{port}", "--partition-id", str(i),
            "--num-partitions", str(nodes), "--data-dir", str(data / f"partition-{i}"), "--port", str(free_port()),
            *(node_args or {}).get(i, [])))
    subprocess.run(fedssl_cli("deploy", "federation", federation, "--superlink", f"127.0.0.1:{port}"),
                   env=procs.env, check=True, capture_output=True)
    return port


def start_three_nodes_one_nan(procs: Processes, data: Path) -> None:
    """A SuperLink and three SuperNodes (node 2 uploads NaN) as processes on 127.0.0.1, registered as the
    federation "local-deployment"."""
    write_partitions(procs, data, clients=3)
    start_deployment(procs, data, 3, "local-deployment", {2: ["--node-config", 'fault="nan"']})


def test_deployment_survives_a_killed_supernode_and_rejects_nan(tmp_path: Path, processes: Processes) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    start_three_nodes_one_nan(processes, data)
    # 25 local steps: a round lasts long enough (about a second) for the kill to land while node 1 trains
    flwr_run(processes, "local-deployment", out, "clients=3; rounds=2; local_steps=25; flower.round_timeout=20")
    log = out / "flower.log"
    wait_for(lambda: log.is_file() and "round 2: 3 client(s) sampled" in log.read_text(), 240, "round 2", processes)
    processes.stop("node1")  # killed while round 2 is under way
    wait_for(lambda: (out / "report.md").is_file(), 240, "the end of the run (its report)", processes)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["failed"], r["rejected"]) for r in rows] == [(0, 1), (1, 1)]
    text = log.read_text()
    assert "round 2: client 1 failed (no reply within 20 s)" in text
    assert "rejected the upload of client 2" in text and "NaN" in text
    assert np.isfinite(json.loads((out / "final.json").read_text())["final"]["knn_acc"])
    report = (out / "report.md").read_text()
    assert "| failed | rejected |" in report and "on the wire" in report
    # each node read its own folder, which holds its partition alone
    for i in range(3):
        meta = json.loads((data / f"partition-{i}" / "partition.json").read_text())
        assert f"client {i} is node" in text
        assert f"{meta['num-samples']} images from {data / f'partition-{i}'} (digest {meta['digest']})" in text
        assert sorted(p.name for p in (data / f"partition-{i}").iterdir()) == ["images.npy", "partition.json"]


def test_tls_with_supernode_authentication(tmp_path: Path, processes: Processes) -> None:
    certs, data, out, port = tmp_path / "certs", tmp_path / "data", tmp_path / "run", free_port()
    subprocess.run(fedssl_cli("deploy", "credentials", "--out", str(certs), "--supernodes", "3"), env=processes.env,
                   check=True, capture_output=True)
    write_partitions(processes, data, clients=2)
    processes.start("superlink", fedssl_cli("deploy", "superlink", "--host", "127.0.0.1", "--port", str(port),
                                            "--certs", str(certs), "--auth"))
    wait_for(lambda: listening(port), 60, "the SuperLink", processes)
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port)) as raw, tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")  # the SuperLink speaks TLS with the certificate we made
    subprocess.run(fedssl_cli("deploy", "federation", "secure", "--superlink", f"127.0.0.1:{port}",
                              "--certs", str(certs)), env=processes.env, check=True, capture_output=True)
    flwr = str(Path(sys.executable).parent / "flwr")
    for i in range(2):  # register the keys of the two real nodes; supernode-2 stays unknown
        reg = subprocess.run([flwr, "supernode", "register", str(certs / f"supernode-{i}.pub"), "secure"],
                             env=processes.env, capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

    def node(name: str, partition: int, key: str) -> subprocess.Popen:
        return processes.start(name, fedssl_cli(
            "deploy", "supernode", "--superlink", f"127.0.0.1:{port}", "--partition-id", str(partition),
            "--num-partitions", "2", "--data-dir", str(data / f"partition-{partition}"), "--port", str(free_port()),
            "--certs", str(certs), "--key", str(certs / key)))

    intruder = node("intruder", 1, "supernode-2")
    node("node0", 0, "supernode-0")
    node("node1", 1, "supernode-1")
    wait_for(lambda: intruder.poll() is not None, 90, "the SuperLink to refuse the unknown key", processes)
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in processes.log("intruder")
    assert "No SuperNode found with the given public key" in processes.log("superlink")

    flwr_run(processes, "secure", out, "clients=2; rounds=1")
    wait_for(lambda: (out / "report.md").is_file(), 240, "the end of the run over TLS (its report)", processes)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["failed"], r["rejected"]) for r in rows] == [(0, 0)]
    assert json.loads((out / "engine.json").read_text()) == {"engine": "flower", "runtime": "deployment"}
    # a deployment computes what the in-process engine computes for the same config and seed
    local = start_run(tiny_config(*(item.strip() for item in TINY_SET.split(";")), "clients=2", "rounds=1"),
                      tmp_path / "local")
    assert rows[0]["loss"] == local.metrics[0]["loss"]
    assert json.loads((out / "final.json").read_text())["final"] == local.final
