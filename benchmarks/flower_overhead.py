"""What Flower's deployment runtime costs per message, and where a message's seconds go, on this machine.

    python benchmarks/flower_overhead.py [--clients 2] [--rounds 3] [--tls] [--variants flower,polling,worker]

Runs the demo model (FedMoCo, ResNet-10 width 16, synthetic images: the payload depends on
the model only) for a few rounds of one local step: in-process, in Flower's simulation runtime,
and in real deployments on this machine (a SuperLink and one SuperNode per client as separate
processes, ``flwr run .``), one per variant: ``flower`` (Flower's stock SuperNode: a
``flwr-clientapp`` process per message, its 3 s / 0.5 s waits), ``polling`` (those waits capped)
and ``worker`` (capped, and the node's long-lived worker: ``fedssl deploy supernode``'s default).
The SuperNodes reach the SuperLink through a counting TCP proxy, so the bytes of the Fleet API on
the socket (HTTP, TLS with ``--tls``, the nodes' polling) are measured, not estimated. Every
process writes its phase timestamps to ``FEDSSL_FLOWER_TRACE`` (``fedssl.engines.flower.timing``);
prints the bytes per message, where a train message's seconds go per variant, and the seconds per
round on each engine.
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
from fedssl.engines.flower.deploy import (FLEET_POLL_SECONDS, export_partitions, flower_env, make_credentials,
                                          superlink_command, supernode_command, write_federation)
from fedssl.engines.flower.timing import TRACE_ENV, read_trace
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


VARIANTS = {  # name -> (a flwr-clientapp process per message, the SuperNode's Fleet polling cap in s; None: Flower's)
    "flower": (True, None),  # Flower 1.41 as it comes: flower-supernode, a process per message, 3 s / 0.5 s waits
    "polling": (True, FLEET_POLL_SECONDS),  # a process per message, the waits capped
    "worker": (False, FLEET_POLL_SECONDS),  # fedssl deploy supernode's default: the node's worker, waits capped
}


def deployment(cfg_overrides: list[str], clients: int, tls: bool, work: Path, variant: str) -> dict:
    """A real deployment through the counting proxy; the run directory's rows, the trace and the socket totals."""
    per_message, fleet_poll = VARIANTS[variant]
    trace = work / "trace.jsonl"
    env = {**flower_env(), "FLWR_HOME": str(work / "flwr-home"), TRACE_ENV: str(trace)}
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
                                     data_dir=work / "data" / f"partition-{i}", port=_free_port(), certs=certs,
                                     per_message=per_message, fleet_poll=fleet_poll), f"node{i}")
        write_federation("bench", f"127.0.0.1:{port}", certs=certs)
        time.sleep(15)  # the nodes connect (and the workers import torch); then measure their idle traffic
        idle_start, (u0, d0) = time.monotonic(), proxy.totals()
        time.sleep(10)
        u1, d1 = proxy.totals()
        idle_seconds = time.monotonic() - idle_start
        idle_rate = ((u1 - u0) / idle_seconds, (d1 - d0) / idle_seconds)
        out = work / "run"
        settings = "; ".join(cfg_overrides)
        begin, cpu0 = time.monotonic(), _cpu_seconds()
        subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "bench", "--run-config",
                        f"config='configs/cifar10/fedmoco.toml' set='{settings}' out=\"{out}\""],
                       env=env, check=True, capture_output=True, timeout=300)
        _wait(lambda: (out / "final.json").is_file(), 900, "the deployed run")
        seconds, cpu = time.monotonic() - begin, _cpu_seconds() - cpu0
        u2, d2 = proxy.totals()
        return {"rows": read_jsonl(out / "metrics.jsonl"), "ledger": read_jsonl(out / "ledger.jsonl"),
                "trace": read_trace(trace), "socket_up": u2 - u1, "socket_down": d2 - d1, "idle_rate": idle_rate,
                "seconds": seconds, "cpu": cpu}
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _cpu_seconds() -> float:
    """CPU seconds used by the whole machine so far (user + system, all cores; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


PHASES = (  # (row, end mark(s)): each phase runs from the end of the one before it (or from the push's start)
    ("the server's push to the SuperLink", "push"),
    ("to the node: the SuperNode's Fleet polling, the task's start", "process_start|acquired"),
    ("process start, Flower's imports, the message's objects in (Flower)", "import_start|pulled"),
    ("imports: torch, fedssl, the methods", "import_end"),
    ("app load (Flower's ClientApp)", "handler_start"),
    ("config parse", "config"),
    ("data and model build (the client role)", "build"),
    ("deserialisation (the download into tensors)", "deserialise"),
    ("the client's compute (local training)", "compute"),
    ("serialisation (the upload into records)", "serialise|handler_end"),
    ("back to the server: pushes, the SuperNode's reply polling", "reply"),
)


def breakdown(trace: list[dict], message_type: str = "train") -> dict[str, float]:
    """Mean seconds per phase over the traced messages of ``message_type`` (plus ``total``); a phase a message
    does not have (imports in the worker) counts 0, and phases that overlap (the node starts pulling a
    message while the server still pushes it) are counted once, in the earlier."""
    pushed = {mid: (e["began"], e["t"]) for e in trace if e["event"] == "push" for mid in e["mids"]}
    replied = {e["mid"]: e["t"] for e in trace if e["event"] == "reply"}
    sums: dict[str, float] = {}
    nodes = [e for e in trace if e["event"] == "node" and e["type"] == message_type and e["mid"] in replied]
    for e in nodes:
        began, pushed_at = pushed[e["mid"]]
        marks = {**e["marks"], "push": pushed_at, "reply": replied[e["mid"]]}
        at = began
        for row, ends in PHASES:
            end = next((marks[k] for k in ends.split("|") if marks.get(k) is not None), at)
            sums[row] = sums.get(row, 0.0) + max(end - at, 0.0)
            at = max(at, end)
        sums["total"] = sums.get("total", 0.0) + marks["reply"] - began
    return {k: v / max(len(nodes), 1) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="TLS between the SuperNodes and the SuperLink")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"deployments to run, of {', '.join(VARIANTS)}")
    parser.add_argument("--keep", help="a folder to keep the deployments' logs, traces and run directories in")
    args = parser.parse_args()
    console = Console()
    base = load_toml(REPO / "configs/cifar10/fedmoco.toml")
    sets = overrides(args.clients, args.rounds)
    cfg = make_config(base, sets)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    deps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        local = start(cfg, work / "local", engine="local")
        sim = start(cfg, work / "sim", engine="flower")
        for name in variants:
            deps[name] = deployment(sets, args.clients, args.tls, work / f"deploy-{name}", name)
    title = (f"FedMoCo demo model, {args.clients} clients x {args.rounds} rounds of 1 local step"
             f"{' (TLS)' if args.tls else ''}")
    console.print(bytes_table(deps[variants[0]], args, title))
    console.print(phases_table(deps, title))
    console.print(rounds_table(local.metrics, sim.metrics, deps, title))
    console.print(f"losses in-process {[round(r['loss'], 4) for r in local.metrics]}, simulation "
                  f"{[round(r['loss'], 4) for r in sim.metrics]}, " + ", ".join(
                      f"deployment {n} {[round(r['loss'], 4) for r in d['rows']]}" for n, d in deps.items()))
    print(json.dumps({n: {k: d[k] for k in ("socket_up", "socket_down", "idle_rate", "seconds", "cpu")}
                      for n, d in deps.items()}))


def bytes_table(dep: dict, args: argparse.Namespace, title: str) -> Table:
    """What a message weighs: payload, serialised message, socket bytes (the first deployment)."""
    ledger = [r for r in dep["ledger"] if r["kind"] in ("upload", "download")]
    payload = sum(r["bytes"] for r in ledger)
    serialised = sum(r.get("wire_bytes", 0) for r in ledger)
    idle_up, idle_down = dep["idle_rate"]
    socket_total = dep["socket_up"] + dep["socket_down"]
    polling = (idle_up + idle_down) * dep["seconds"]
    from flwr.cli.build import build_fab_from_disk

    fab = len(build_fab_from_disk(REPO)) * args.clients  # each SuperNode downloads the app bundle once per run
    train_messages = 2 * args.clients * args.rounds
    table = Table(title=f"{title}: bytes")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("payload per train message (ledger bytes, mean)", human_bytes(payload / train_messages))
    table.add_row("Flower message per train message (serialised, mean)", human_bytes(serialised / train_messages))
    table.add_row("serialisation overhead per message", human_bytes((serialised - payload) / train_messages))
    table.add_row("Fleet API socket bytes over the run (both ways)", human_bytes(socket_total))
    table.add_row(f"  of which idle polling ({human_bytes(idle_up + idle_down)}/s x {dep['seconds']:.0f} s)",
                  human_bytes(polling))
    table.add_row("  of which the app bundle (FAB), fetched once per run by each SuperNode", human_bytes(fab))
    table.add_row("socket bytes per train message beyond its serialised size (polling, FAB, hellos excluded)",
                  human_bytes((socket_total - polling - fab - serialised) / train_messages))
    return table


def phases_table(deps: dict[str, dict], title: str) -> Table:
    """Where a train message's seconds go, per deployment (means over the run's train messages)."""
    table = Table(title=f"{title}: seconds per train message, from the server's push to its reply")
    table.add_column("phase")
    parts = {name: breakdown(dep["trace"]) for name, dep in deps.items()}
    for name in deps:
        per_message, poll = VARIANTS[name]
        table.add_column(f"{name}: {'a process per message' if per_message else 'worker'}, "
                         f"{'Flower polling' if poll is None else f'polling <= {poll:g} s'}", justify="right")
    for row, _ in PHASES:
        table.add_row(row, *(f"{parts[n].get(row, 0.0):.3f}" for n in deps))
    table.add_row("total (push to reply)", *(f"{parts[n].get('total', 0.0):.3f}" for n in deps))
    return table


def rounds_table(local: list[dict], sim: list[dict], deps: dict[str, dict], title: str) -> Table:
    table = Table(title=f"{title}: seconds per round (rounds 2+, mean)")
    table.add_column("engine")
    table.add_column("s / round", justify="right")
    table.add_column("x simulation", justify="right")
    table.add_column("run: wall s, machine CPU s", justify="right")

    def per_round(rows: list[dict]) -> float:
        later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
        return sum(later) / len(later)

    base = per_round(sim)
    table.add_row("in-process", f"{per_round(local):.2f}", f"{per_round(local) / base:.2f}", "")
    table.add_row("Flower simulation", f"{base:.2f}", "1.00", "")
    for name, dep in deps.items():
        table.add_row(f"Flower deployment: {name}", f"{per_round(dep['rows']):.2f}",
                      f"{per_round(dep['rows']) / base:.2f}", f"{dep['seconds']:.0f}, {dep['cpu']:.0f}")
    return table


if __name__ == "__main__":
    main()
