"""What Flower's deployment runtime costs per message, measured on this machine.

    python benchmarks/flower_overhead.py [--clients 2] [--rounds 3] [--tls]

Runs the demo model (FedMoCo, ResNet-10 width 16, synthetic images: the payload depends on
the model only) for a few rounds of one local step, three ways: in-process, Flower's
simulation runtime, and a real deployment on this machine (a SuperLink and one SuperNode
per client as separate processes, ``flwr run .``). The SuperNodes reach the SuperLink
through a counting TCP proxy, so the bytes of the Fleet API on the socket (HTTP, TLS with
``--tls``, the nodes' polling) are measured, not estimated. Prints per message: the payload
bytes (the ledger), the Flower message (serialised objects, the ledger's ``wire_bytes``), the
socket bytes, and the seconds per round on each engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedssl.engines import start
from fedssl.engines.flower.deploy import (export_partitions, flower_env, make_credentials, superlink_command,
                                          supernode_command, write_federation)
from fedssl.resources import human_bytes
from fedssl.run_dir import read_jsonl
from fedssl.config import make_config, load_toml

REPO = Path(__file__).resolve().parents[1]


class CountingProxy:
    """A TCP forwarder 127.0.0.1:port -> target that counts the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = self.down = 0  # node -> SuperLink, SuperLink -> node
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the SuperLink is gone (end of the benchmark)
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def totals(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def overrides(clients: int, rounds: int) -> list[str]:
    return ["dataset=synthetic", f"clients={clients}", f"rounds={rounds}", "partition=iid", "local_steps=1",
            "batch_size=32", "eval.every=0", "eval.probe=false", "threads=1", "flower.connect_timeout=120"]


def deployment(cfg_overrides: list[str], clients: int, tls: bool, work: Path, console: Console) -> dict:
    """A real deployment through the counting proxy; the run directory's rows and the socket totals."""
    env = {**flower_env(), "FLWR_HOME": str(work / "flwr-home")}
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    cfg = make_config(load_toml(REPO / "configs/cifar10/fedmoco.toml"), cfg_overrides)
    export_partitions(cfg, work / "data")
    certs = None
    if tls:
        make_credentials(work / "certs")
        certs = work / "certs"
    port = _free_port()
    started: list[subprocess.Popen] = []

    def launch(command: list[str], name: str) -> None:
        log = open(work / f"{name}.log", "wb")
        started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                        start_new_session=True))

    try:
        launch(superlink_command(host="127.0.0.1", port=port, certs=certs), "superlink")
        _wait(lambda: _listening(port), 60, "the SuperLink")
        proxy = CountingProxy(port)
        for i in range(clients):
            launch(supernode_command(superlink=f"127.0.0.1:{proxy.port}", partition_id=i, num_partitions=clients,
                                     data_dir=work / "data" / f"partition-{i}", port=_free_port(), certs=certs),
                   f"node{i}")
        write_federation("bench", f"127.0.0.1:{port}", certs=certs)
        time.sleep(15)  # the nodes connect; then measure their idle traffic (polling, heartbeats)
        idle_start, (u0, d0) = time.monotonic(), proxy.totals()
        time.sleep(20)
        u1, d1 = proxy.totals()
        idle_seconds = time.monotonic() - idle_start
        idle_rate = ((u1 - u0) / idle_seconds, (d1 - d0) / idle_seconds)
        out = work / "run"
        settings = "; ".join(cfg_overrides)
        begin = time.monotonic()
        subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "bench", "--run-config",
                        f"config='configs/cifar10/fedmoco.toml' set='{settings}' out=\"{out}\""],
                       env=env, check=True, capture_output=True, timeout=120)
        _wait(lambda: (out / "final.json").is_file(), 900, "the deployed run")
        seconds = time.monotonic() - begin
        u2, d2 = proxy.totals()
        return {"rows": read_jsonl(out / "metrics.jsonl"), "ledger": read_jsonl(out / "ledger.jsonl"),
                "socket_up": u2 - u1, "socket_down": d2 - d1, "idle_rate": idle_rate, "seconds": seconds}
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="TLS between the SuperNodes and the SuperLink")
    parser.add_argument("--keep", help="a folder to keep the deployment's logs and run directory in")
    args = parser.parse_args()
    console = Console()
    base = load_toml(REPO / "configs/cifar10/fedmoco.toml")
    sets = overrides(args.clients, args.rounds)
    cfg = make_config(base, sets)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        local = start(cfg, work / "local", engine="local")
        sim = start(cfg, work / "sim", engine="flower")
        dep = deployment(sets, args.clients, args.tls, work / "deploy", console)
    messages = args.clients * (args.rounds + 1)  # a hello and one train message per client and round, each way
    ledger = [r for r in dep["ledger"] if r["kind"] in ("upload", "download")]
    payload = sum(r["bytes"] for r in ledger)
    serialised = sum(r.get("wire_bytes", 0) for r in ledger)
    idle_up, idle_down = dep["idle_rate"]
    socket_total = dep["socket_up"] + dep["socket_down"]
    polling = (idle_up + idle_down) * dep["seconds"]
    from flwr.cli.build import build_fab_from_disk

    fab = len(build_fab_from_disk(REPO)) * args.clients  # each SuperNode downloads the app bundle once per run
    train_messages = 2 * args.clients * args.rounds
    table = Table(title=f"FedMoCo demo model, {args.clients} clients x {args.rounds} rounds of 1 local step"
                        f"{' (TLS)' if args.tls else ''}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("payload per train message (ledger bytes, mean)", human_bytes(payload / train_messages))
    table.add_row("Flower message per train message (serialised, mean)", human_bytes(serialised / train_messages))
    table.add_row("serialisation overhead per message", human_bytes((serialised - payload) / train_messages))
    table.add_row("Fleet API socket bytes over the run (both ways)", human_bytes(socket_total))
    table.add_row(f"  of which idle polling ({human_bytes(idle_up + idle_down)}/s x {dep['seconds']:.0f} s)",
                  human_bytes(polling))
    table.add_row(f"  of which the app bundle (FAB), fetched once per run by each SuperNode", human_bytes(fab))
    table.add_row("socket bytes per train message beyond its serialised size (polling, FAB, hellos excluded)",
                  human_bytes((socket_total - polling - fab - serialised) / train_messages))
    for name, rows in (("in-process", local.metrics), ("Flower simulation", sim.metrics),
                       ("Flower deployment", dep["rows"])):
        later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
        table.add_row(f"seconds per round, {name} (rounds 2+, mean)", f"{sum(later) / len(later):.2f}")
    console.print(table)
    console.print(f"losses in-process {[round(r['loss'], 4) for r in local.metrics]}, simulation "
                  f"{[round(r['loss'], 4) for r in sim.metrics]}, deployment "
                  f"{[round(r['loss'], 4) for r in dep['rows']]}")
    print(json.dumps({"fab": fab, "payload": payload, "serialised": serialised, "socket_up": dep["socket_up"],
                      "socket_down": dep["socket_down"], "idle_rate": dep["idle_rate"], "seconds": dep["seconds"],
                      "train_messages": train_messages}))


if __name__ == "__main__":
    main()
