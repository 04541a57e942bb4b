"""``fedssl deploy supernode``'s process: Flower's SuperNode, its Fleet polling, and the node's worker.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) waits a fixed 3 s before asking
the SuperLink again when it found no message, and 0.5 s between two looks for a ClientApp's reply:
a message that arrives just after a look waits up to 3 s on the node, twice per exchange of a split
method's step. It has no flag for either; this process runs Flower's own ``flower-supernode`` entry
point with both waits capped at ``--fleet-poll`` seconds (each look is one small HTTP request to the
SuperLink: the benchmark measures what the idle polling costs on the socket). ``--fleet-poll 3`` is
Flower's own behaviour.

This process supervises: Flower's SuperNode runs in a child process (``--serve``). A SuperNode that
has joined and then leaves by itself (the SuperLink was restarted and no longer knows its node ID: it
answers 401 and Flower's SuperNode exits) is started again and joins as a new node, which the server
greets and treats as holding nothing of the run; one that never joined (a refused key, a wrong address)
ends this process with its exit status. While the SuperLink is down, Flower's SuperNode retries by
itself. A signal to this process (Ctrl+C, SIGTERM) goes to the SuperNode and ends both.

With ``--worker`` the SuperNode runs with ``--isolation process`` and this process starts the node's
long-lived ClientApp process (:mod:`fedssl.engines.flower.worker`), starts it again if it dies, and
takes it down with it (the worker also exits by itself once this process is gone); the worker outlives
a SuperNode that rejoins, and finds it again on the same Runtime API port.

    python -m fedssl.engines.flower.supernode [--worker] [--fleet-poll S] -- FLOWER-SUPERNODE-ARGS
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import types
from typing import IO

from fedssl.engines.flower.pulls import cap_pull_backoff

WORKER_RESTART_SECONDS = 1.0  # pause before starting a dead worker again
REJOIN_SECONDS = 1.0  # pause before starting again a SuperNode that left its SuperLink
JOINED = b"SuperNode ID:"  # what Flower's SuperNode logs once the SuperLink has accepted it


def cap_fleet_polling(seconds: float) -> None:
    """Cap every wait of Flower's SuperNode loop at ``seconds`` (its module's ``time.sleep``, nothing else)."""
    import flwr.supernode.start_client_internal as loop

    real = time.sleep
    patched = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    patched.sleep = lambda wait: real(min(wait, seconds))
    loop.time = patched  # type: ignore[attr-defined]


def worker_command(runtime_port: int, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "fedssl.engines.flower.worker", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--parent-pid", str(parent_pid)]


def keep_worker(command: list[str]) -> threading.Thread:
    """Run the worker; start it again whenever it exits (a daemon thread: ends with this process)."""

    def loop() -> None:
        while True:
            code = subprocess.call(command)
            print(f"fedssl: the node's worker exited ({code}); starting it again", file=sys.stderr, flush=True)
            time.sleep(WORKER_RESTART_SECONDS)

    thread = threading.Thread(target=loop, name="fedssl-worker", daemon=True)
    thread.start()
    return thread


def runtime_port(flower_args: list[str]) -> int:
    """The SuperNode's Runtime API port (its ``--port``; Flower's default otherwise)."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    if "--port" in flower_args:
        return int(flower_args[flower_args.index("--port") + 1])
    return int(SUPERNODE_UVICORN_DEFAULT_PORT)


def relay(stream: IO[bytes]) -> bool:
    """Copy the SuperNode's output to ours, line by line, until it ends; whether it said it joined."""
    joined = False
    for line in iter(stream.readline, b""):
        joined = joined or JOINED in line
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    return joined


def supervise(command: list[str]) -> int:
    """Run the SuperNode ``command``; start it again whenever it leaves by itself after having joined."""
    stopping = threading.Event()
    running: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for proc in running:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            running[:] = [proc]
            joined = relay(proc.stdout)  # type: ignore[arg-type]
            code = proc.wait()
            if stopping.is_set() or not joined:
                return code
            print(f"fedssl: the SuperNode left the SuperLink (exit {code}); joining it again as a new node",
                  file=sys.stderr, flush=True)
            time.sleep(REJOIN_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(flower_args: list[str], fleet_poll: float | None) -> None:
    """Flower's own SuperNode in this process, its waits capped at ``fleet_poll`` s (None: Flower's own)."""
    if fleet_poll is not None:
        cap_fleet_polling(fleet_poll)
        cap_pull_backoff()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run ClientApps in one long-lived worker process")
    parser.add_argument("--fleet-poll", type=float, help="the SuperNode's longest wait between two looks for "
                                                          "messages/replies, s (default: Flower's own waits)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the supervised SuperNode itself
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    if args.serve:
        serve(flower_args, args.fleet_poll)
        return
    if args.worker:
        flower_args = [*flower_args, "--isolation", "process"]
        keep_worker(worker_command(runtime_port(flower_args), os.getpid()))
    poll = [] if args.fleet_poll is None else ["--fleet-poll", f"{args.fleet_poll:g}"]
    sys.exit(supervise([sys.executable, "-m", "fedssl.engines.flower.supernode", "--serve", *poll, "--",
                        *flower_args]))


if __name__ == "__main__":
    main()
