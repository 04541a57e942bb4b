"""``fedssl deploy supernode``'s process: Flower's SuperNode, its Fleet polling, and the node's worker.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) waits a fixed 3 s before asking
the SuperLink again when it found no message, and 0.5 s between two looks for a ClientApp's reply:
a message that arrives just after a look waits up to 3 s on the node, twice per exchange of a split
method's step. It has no flag for either; this process runs Flower's own ``flower-supernode`` entry
point with both waits capped at ``--fleet-poll`` seconds (each look is one small HTTP request to the
SuperLink: the benchmark measures what the idle polling costs on the socket). ``--fleet-poll 3`` is
Flower's own behaviour.

With ``--worker`` the SuperNode runs with ``--isolation process`` and this process starts the node's
long-lived ClientApp process (:mod:`fedssl.engines.flower.worker`), starts it again if it dies, and
takes it down with it (the worker also exits by itself once this process is gone).

    python -m fedssl.engines.flower.supernode [--worker] [--fleet-poll S] -- FLOWER-SUPERNODE-ARGS
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import types

from fedssl.engines.flower.pulls import cap_pull_backoff

WORKER_RESTART_SECONDS = 1.0  # pause before starting a dead worker again


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run ClientApps in one long-lived worker process")
    parser.add_argument("--fleet-poll", type=float, help="the SuperNode's longest wait between two looks for "
                                                          "messages/replies, s (default: Flower's own waits)")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    if args.worker:
        flower_args = [*flower_args, "--isolation", "process"]
    if args.fleet_poll is not None:
        cap_fleet_polling(args.fleet_poll)
        cap_pull_backoff()
    if args.worker:
        keep_worker(worker_command(runtime_port(flower_args), os.getpid()))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
