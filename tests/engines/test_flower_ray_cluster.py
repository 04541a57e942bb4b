"""Flower's simulation runtime on a Ray cluster (``flower.ray_address``): a head and a worker node started here
as ``ray start`` processes on 127.0.0.1, one CPU each, so that each node runs one of the two ClientApps; the
metrics equal the in-process engine's. An address where no cluster answers is refused before any run directory
exists.

The test stops what it started, and only that: each ``ray start --block`` leads its own process group (its GCS,
raylet, agents and the ClientApp workers), which is sent SIGTERM, then SIGKILL. ``ray stop`` is never used: it
would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedssl.cli import main
from fedssl.config import config_hash
from fedssl.engines import read_engine, start
from fedssl.engines.local import start_run
from tests.engines.test_flower_sim import FLOWER_TINY, _same, _set_args
from tests.helpers import tiny_config

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started"  # what `ray start` prints once its node is up
START_SECONDS = 120.0  # a node's start on a busy 2-core machine took about 10 s


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on now (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Node:
    """One ``ray start --block`` process (the leader of its process group) and its own temp dir."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while STARTED not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not start a node:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to its group (``ray start --block`` then stops its processes), SIGKILL to what is left."""
        for sig, wait in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.process):
                time.sleep(0.2)
            if not _group_alive(self.process):
                return


def _group_alive(leader: subprocess.Popen[bytes]) -> bool:
    leader.poll()  # reaps the leader once it exited
    try:
        os.killpg(leader.pid, 0)
    except ProcessLookupError:
        return False
    return True


WORKER_PORTS = 200  # the span of a node's --min-worker-port .. --max-worker-port


def node_ports(taken: set[int]) -> list[int]:
    """Six free component ports and the first of a worker-port span, none of them, nor the span, in ``taken``
    (the cluster's ports so far; Ray refuses a node whose worker span holds one of its own ports); adds them."""
    while True:
        ports, start = free_ports(6), free_ports(1)[0]
        span = set(range(start, start + WORKER_PORTS + 1))
        if not (set(ports) | span) & taken and not set(ports) & span:
            taken.update(ports, span)
            return [*ports, start]


def start_node(root: Path, name: str, taken: set[int], *args: str) -> Node:
    """``ray start --block`` with 1 CPU, no GPU, a 100 MB object store, ports of its own, in ``root/name``."""
    temp_dir = root / name
    temp_dir.mkdir()
    ports = node_ports(taken)
    command = [RAY, "start", "--block", *args, "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--node-manager-port={ports[0]}",
               f"--object-manager-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
               f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
               f"--metrics-export-port={ports[5]}", f"--min-worker-port={ports[6]}", f"--max-worker-port={ports[6] + WORKER_PORTS}"]
    log = root / f"{name}.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Node(process, temp_dir, log)


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A Ray head and one worker node on 127.0.0.1, stopped (and their temp dirs removed) afterwards."""
    if not Path(RAY).is_file():
        pytest.skip("the ray command is not installed (pip install 'ray==2.55.*'), so no cluster can be started")
    root = Path(tempfile.mkdtemp(prefix="fray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    nodes: list[Node] = []
    try:
        gcs, client, dashboard = free_ports(3)
        taken = {gcs, client, dashboard}
        address = f"127.0.0.1:{gcs}"
        nodes.append(start_node(root, "head", taken, "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                                f"--ray-client-server-port={client}", f"--dashboard-port={dashboard}",
                                "--include-dashboard=false"))
        nodes[0].wait_started()
        nodes.append(start_node(root, "worker", taken, f"--address={address}", "--node-ip-address=127.0.0.1"))
        nodes[1].wait_started()
        yield Cluster(address, nodes[0], nodes[1])
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _ran_a_client_app(node: Node) -> bool:
    """Whether a ClientApp actor ran on ``node`` (Ray heads each actor's log with its class)."""
    return any(":actor_name:ClientAppActor" in log.read_text(errors="replace")
               for log in node.temp_dir.glob("session_*/logs/worker-*.out"))


@pytest.mark.slow
def test_fedmoco_on_a_two_node_ray_cluster_equals_the_in_process_engine(ray_cluster: Cluster,
                                                                         tmp_path: Path) -> None:
    cfg = tiny_config(*FLOWER_TINY, f"flower.ray_address={json.dumps(ray_cluster.address)}")
    flower = start(cfg, tmp_path / "flower", engine="flower")
    local = start_run(cfg, tmp_path / "local")
    assert _same(flower.metrics) == _same(local.metrics) and flower.final == local.final
    ray = read_engine(tmp_path / "flower")["ray"]
    assert ray["address"] == ray_cluster.address and [n["cpus"] for n in ray["nodes"]] == [1.0, 1.0]
    assert _ran_a_client_app(ray_cluster.head) and _ran_a_client_app(ray_cluster.worker)
    assert f"ClientApps on the Ray cluster at {ray_cluster.address}: 2 node(s)" in (
        tmp_path / "flower" / "flower.log").read_text()


def test_an_address_where_no_cluster_answers_is_refused_with_the_fix(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    out = tmp_path / "run"
    args = ["run", *_set_args(*FLOWER_TINY, f"flower.ray_address=\"127.0.0.1:{port}\""), "--engine", "flower",
            "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"no Ray cluster answers at flower.ray_address = 127.0.0.1:{port}" in err
    assert f"ray start --head --port={port}" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("address, says", [("ray://10.0.0.5:10001", "ray:// is Ray Client"),
                                           ("10.0.0.5", "HOST:PORT"), ("10.0.0.5:70000", "HOST:PORT")])
def test_malformed_addresses_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str,
                                               says: str) -> None:
    args = ["run", *_set_args(f"flower.ray_address=\"{address}\""), "--engine", "flower", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_where_a_run_ran_is_not_part_of_what_it_computed() -> None:
    """A run resumes on another cluster (or GPU share) with the same checkpoint."""
    cfg = tiny_config()
    assert config_hash(tiny_config('flower.ray_address="10.0.0.5:6379"', "flower.client_gpus=1")) == config_hash(cfg)
    assert config_hash(tiny_config("flower.client_cpus=2")) != config_hash(cfg)
