"""A SuperNode's long-lived ClientApp process (Flower's ``--isolation process`` mode): one per node, not per message.

A SuperNode of Flower 1.41 started plainly (``--isolation subprocess``) starts ``flower-superexec``,
which asks the SuperNode's Runtime API for a task once a second and starts a new ``flwr-clientapp``
process for each message: every message pays a Python start, Flower's imports, torch's and fedssl's
imports, the config parse, the data read and the model build. Started with ``--isolation process``,
the SuperNode leaves running its ClientApps to a process outside it: this worker. It does what
``flwr-clientapp`` does for one message, with Flower's own functions over the same Runtime API
(acquire the task, pull its message and context, run the ClientApp, push the reply and the context
back), in a loop, in one process that keeps torch, the parsed config, the node's data and its built
client role between messages. Flower stays the transport, the authentication and the orchestration.

What survives what: the node's ``context.state`` travels exactly as with ``flwr-clientapp`` (the
SuperNode hands it over with each message and takes it back after), so what a client keeps between
messages (its round state, a split client's nets and optimizer buffers) is the SuperNode's, never the
worker's. The worker holds only caches rebuilt from the config (the lru caches of ``node.py`` and
``split.py``). A worker that dies (a crash, ``kill``) is started again by ``fedssl deploy supernode``
and loses nothing but those caches: its next message rebuilds them, as a node's first message does
(the message it was handling fails, and the server counts that client as failed for the exchange).
A SuperNode that restarts loses ``context.state`` as before; the server re-sends the config and nets.

    python -m fedssl.engines.flower.worker --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from typing import Any

import httpx
from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedssl.engines.flower import timing
from fedssl.engines.flower.pulls import cap_pull_backoff
from fedssl.parent_watch import exit_with_parent

TASK_POLL_SECONDS = 0.02  # between two asks for a task (a local HTTP call; flower-superexec waits 1 s)
log = logging.getLogger("fedssl.worker")


def _client(address: str, *interceptors: Any) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker())


@functools.lru_cache(maxsize=4)
def _client_app(fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> ClientApp:
    """The run's ClientApp, installed from its app bundle and loaded once per bundle."""
    install_from_fab(fab_content, skip_prompt=True)
    return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(fab_id, fab_version, fab_hash)


def handle_task(address: str, token: str, acquired: float) -> None:
    """One message, as ``flwr-clientapp`` handles it, but in this process: input in, the ClientApp, reply out."""
    client = _client(address, RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = pull_task_input(client)
        phases = timing.start(message.metadata.message_id, message.metadata.message_type, "worker")
        if phases is not None:
            phases.mark("acquired", acquired)
        timing.mark("pulled")
        app = _client_app(run.fab_id, run.fab_version, fab.hash_str, fab.content)
        timing.mark("loaded")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 (as flwr-clientapp: the failure goes back as an error reply)
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = str(type(ex)) + ":<'" + str(ex) + "'>"
        log.error("the ClientApp raised: %s", details)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                timing.mark("pushed")
            push_task_output(client, context, status, details)
        finally:
            heartbeat.stop()
            client.close()
            timing.finish()


def serve(address: str, poll: float = TASK_POLL_SECONDS) -> None:
    """Ask the SuperNode for a ClientApp task every ``poll`` s; handle each in this process, forever."""
    client = _client(address)
    wanted = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log.info("fedssl worker: ClientApp tasks of the SuperNode at %s run in this process", address)
    while True:
        try:
            answer = client.AcquireTask(wanted)
        except httpx.TransportError:  # the SuperNode's Runtime API is not up yet (or restarting)
            time.sleep(10 * poll)
            continue
        if answer.HasField("task") and answer.token:
            handle_task(address, answer.token, time.time())
        else:
            time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A SuperNode's long-lived ClientApp process")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (fedssl deploy supernode) is gone")
    parser.add_argument("--poll", type=float, default=TASK_POLL_SECONDS, help="seconds between two asks for a task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    import fedssl.engines.flower.client_app  # noqa: F401 (torch, the methods, the app: once, before any message)

    cap_pull_backoff()  # the SuperNode hands over a task before it holds the message's objects

    try:
        serve(args.runtime_api_address, args.poll)
    except KeyboardInterrupt:  # Ctrl+C in the node's terminal reaches the worker too: end without a traceback
        log.info("fedssl worker: interrupted; stopping")


if __name__ == "__main__":
    main()
