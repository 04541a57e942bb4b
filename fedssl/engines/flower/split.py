"""Split learning over Flower: the split protocol's tensors as messages, and back (translation only).

The round is ``fedssl.engines.steps.split_round`` (the same driver as in-process); the steps
reach the clients as messages through the :class:`~fedssl.engines.flower.link.Link`:

- ``train.forward``: the step's task (round, step, batches served, the client-nets' version), with the
  latest client-nets for a client that does not hold them; the reply: its activations at the cut;
- ``train.backward``: its slice of the server's gradient; the reply: an acknowledgement;
- ``train.sync``: the reply holds its client-nets; ``train.average``: the sync's average.

On the node, each message is one call of the method's client role (``SplitMethod.build_clients``,
one client), whose state (client-nets, optimizer buffers) is kept in ``context.state`` between
messages. Every message carries the version of the client-nets the server believes the client
holds; a node that holds another (its state was lost) fails the message and gets them again.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from torch import Tensor

from fedssl.config import RunConfig
from fedssl.engines.flower import node, timing
from fedssl.engines.flower.link import Link, Request, Response
from fedssl.engines.flower.messages import (AVERAGE, BACKWARD, FORWARD, RESULT, SYNC, TASK, content, from_record,
                                           metrics_record, to_record)
from fedssl.engines.steps import Arrivals, stack_rows
from fedssl.errors import FedSSLError
from fedssl.methods import METHODS
from fedssl.methods.base import MethodContext, Payload
from fedssl.methods.split import SplitClients, SplitMethod, Stacked, StepTask

NETS, ACTIVATIONS, GRADIENT = "nets", "activations", "gradient"  # record names
STATE = "fedssl.split.state"  # context.state: this client's role state (client-nets, optimizer buffers)
VERSION = "fedssl.split.version"  # context.state: the version of the client-nets it holds


# ------------------------------------------------------------------ the server side (in the ServerApp)


class FlowerSplitExchange:
    """``split_round``'s exchange over Flower: one message per client and step, its reply as rows of a stack."""

    def __init__(self, link: Link, method: SplitMethod) -> None:
        self.link, self.method = link, method
        self.timeout = method.cfg.flower.round_timeout
        self.clock = {"forward": 0.0, "backward": 0.0, "sync": 0.0, "client": 0.0}  # wall s per exchange kind

    def timing(self, steps: int, round_seconds: float) -> dict[str, float]:
        """The round's measured seconds: per step (all of it, its two exchanges, the slowest client's compute
        in them) and the sync's; the server's own step is what the exchanges leave of a step."""
        per = 1.0 / steps if steps else 0.0
        return {"step_seconds": (round_seconds - self.clock["sync"]) * per,
                **{f"{kind}_seconds": self.clock[kind] * per for kind in ("forward", "backward", "client")},
                "sync_seconds": self.clock["sync"]}

    def _task(self, round_index: int, step: int, client: int, served: int) -> dict[str, Any]:
        return {"round": round_index, "step": step, "served": served, "client": client, "version": self.method.version}

    def _send(self, requests: list[Request]) -> tuple[dict[int, RecordDict], Arrivals]:
        """Send, collect: the replies' contents by client, and the failures and wire bytes as Arrivals."""
        replies: dict[int, RecordDict] = {}
        faults = Arrivals(torch.empty(0, dtype=torch.long), {}, wire_down={}, wire_up={})
        response: Response
        began, slowest = time.perf_counter(), 0.0
        for response in self.link.exchange(requests, self.timeout):
            faults.wire_down[response.client] = response.wire_down  # type: ignore[index]
            faults.wire_up[response.client] = response.wire_up  # type: ignore[index]
            if response.reply is None:
                faults.failed[response.client] = response.failure
            else:
                replies[response.client] = response.reply.content
                slowest = max(slowest, _compute_seconds(response.reply.content))
        kind = {FORWARD: "forward", BACKWARD: "backward"}.get(requests[0].message_type, "sync") if requests else "sync"
        self.clock[kind] += time.perf_counter() - began
        self.clock["client"] += slowest if kind != "sync" else 0.0
        return replies, faults

    def _arrivals(self, requests: list[Request], record: str | None, like: Payload) -> Arrivals:
        replies, faults = self._send(requests)
        rows: dict[int, Payload] = {}
        for client, reply in replies.items():
            try:
                rows[client] = from_record(reply[record]) if record else {}
            except KeyError:
                faults.failed[client] = f"its reply holds no {record}"
        arrived = stack_rows(rows, like) if record else Arrivals(
            torch.tensor(sorted(rows), dtype=torch.long), {})
        arrived.failed, arrived.wire_down, arrived.wire_up = faults.failed, faults.wire_down, faults.wire_up
        return arrived

    def forward(self, task: StepTask, latest: Payload, fetch: Tensor) -> Arrivals:
        nets = {NETS: to_record(latest)}  # serialised once, sent to every client that lacks them
        requests = [Request(c, FORWARD, self._task(task.round, task.step, c, int(s)), nets if f else {})
                    for c, s, f in zip(task.clients.tolist(), task.served.tolist(), fetch.tolist())]
        return self._arrivals(requests, ACTIVATIONS, self.method.activations_like())

    def backward(self, task: StepTask, gradient: Stacked) -> Arrivals:
        requests = [Request(c, BACKWARD, self._task(task.round, task.step, c, int(s)),
                            {GRADIENT: to_record({k: v[j].cpu() for k, v in gradient.items()})})
                    for j, (c, s) in enumerate(zip(task.clients.tolist(), task.served.tolist()))]
        return self._arrivals(requests, None, {})

    def sync(self, round_index: int, clients: Tensor) -> Arrivals:
        requests = [Request(c, SYNC, self._task(round_index, -1, c, -1)) for c in clients.tolist()]
        return self._arrivals(requests, NETS, self.method.latest())

    def send_average(self, round_index: int, clients: Tensor, average: Payload) -> Arrivals:
        nets = {NETS: to_record(average)}
        requests = [Request(c, AVERAGE, self._task(round_index, -1, c, -1), nets) for c in clients.tolist()]
        return self._arrivals(requests, None, {})


def _compute_seconds(reply: RecordDict) -> float:
    """The seconds a node says it computed for a reply (0 if it does not say)."""
    result = reply.metric_records.get(RESULT)
    return float(result["compute-seconds"]) if result is not None and "compute-seconds" in result else 0.0


# ------------------------------------------------------------------ the client side (in the ClientApp)


@functools.lru_cache(maxsize=1)
def _node_clients(cfg: RunConfig, setup: node.NodeSetup) -> tuple[SplitClients, dict[str, Any]]:
    """This node's client role (one client) and its initial state (the seeded start)."""
    data = node.client_data(cfg, setup)
    ctx = MethodContext(cfg, data.info, node.resolve_device(cfg.device))
    clients = METHODS[cfg.method].build_clients(ctx, [setup.partition_id])  # type: ignore[attr-defined]
    clients.use_data(lambda _: data)
    return clients, _flat(clients.state_dict())


def _flat(state: dict[str, dict[str, Tensor]]) -> Payload:
    """A role's state of ONE client ({part: {name: (1, ...)}}) as one payload ``part/name`` -> (...)."""
    return {f"{key}/{name}": t[0].detach().clone() for key, stack in state.items() for name, t in stack.items()}


def _stacked(flat: Payload) -> dict[str, dict[str, Tensor]]:
    state: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        part, name = key.split("/", 1)
        state.setdefault(part, {})[name] = t.unsqueeze(0)
    return state


def _task(message_content: RecordDict, setup: node.NodeSetup) -> tuple[StepTask, int]:
    task = message_content[TASK]
    if int(task["client"]) != setup.partition_id:
        raise FedSSLError(f"a message for client {task['client']} reached the node of client {setup.partition_id}")
    step = StepTask(int(task["round"]), int(task["step"]), torch.tensor([setup.partition_id]),
                    torch.tensor([int(task["served"])]))
    return step, int(task["version"])


def _role(cfg: RunConfig, setup: node.NodeSetup, context: Context) -> tuple[SplitClients, int]:
    """The node's role with this client's state from ``context.state`` (the seeded start if it holds none)."""
    clients, initial = _node_clients(cfg, setup)
    timing.mark("build")
    saved = node.held(context, STATE)
    clients.load_state_dict(_stacked(saved or initial))
    timing.mark("deserialise")  # the client's state out of context.state
    record = context.state.config_records.get(VERSION)
    return clients, (int(record["version"]) if record is not None else 0)


def _keep(context: Context, clients: SplitClients, version: int) -> None:
    node.keep(context, _flat(clients.state_dict()), STATE)
    context.state[VERSION] = ConfigRecord({"version": version})


def client_forward(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context) -> RecordDict:
    """Take the latest client-nets if they came (else hold the version the server expects); the activations."""
    task, version = _task(message_content, setup)
    clients, held = _role(cfg, setup, context)
    if NETS in message_content:
        clients.receive(task.clients, from_record(message_content[NETS]))
        held = version
    if held != version:
        raise FedSSLError(f"this client holds client-nets of version {held}, the server's are version {version} "
                          "(its state was lost); the server re-sends them")
    began = time.perf_counter()
    activations = clients.forward(task)
    seconds = time.perf_counter() - began
    timing.mark("compute")
    _keep(context, clients, held)
    return content(**{ACTIVATIONS: to_record({k: v[0] for k, v in activations.items()}),
                      RESULT: metrics_record({"compute-seconds": seconds})})


def client_backward(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context
                    ) -> RecordDict:
    """The gradient of the step's activations: back-propagate (recomputing the forward), update; keep the nets."""
    task, version = _task(message_content, setup)
    clients, held = _role(cfg, setup, context)
    if held != version:
        raise FedSSLError(f"a backward for client-nets of version {version} on a client holding version {held}")
    gradient = {k: v.unsqueeze(0) for k, v in from_record(message_content[GRADIENT]).items()}
    began = time.perf_counter()
    clients.backward(task, gradient)
    seconds = time.perf_counter() - began
    timing.mark("compute")
    _keep(context, clients, held)
    return content(**{RESULT: metrics_record({"steps": 1, "compute-seconds": seconds})})


def client_sync(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context) -> RecordDict:
    """The client-nets go up."""
    task, _ = _task(message_content, setup)
    clients, _ = _role(cfg, setup, context)
    return content(**{NETS: to_record({k: v[0] for k, v in clients.upload(task.clients).items()})})


def client_average(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context
                   ) -> RecordDict:
    """The sync's average comes down: the client holds the latest client-nets."""
    task, version = _task(message_content, setup)
    clients, _ = _role(cfg, setup, context)
    clients.receive(task.clients, from_record(message_content[NETS]))
    _keep(context, clients, version)
    return content(**{RESULT: metrics_record({"steps": 0})})
