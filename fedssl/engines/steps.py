"""The round logic of split methods both engines share: one driver, :func:`split_round`, over an exchange.

A round of a split method (``fedssl.methods.split``) is the same whichever engine runs it; only
the *exchange* differs: how the step's tensors reach the clients and how their replies come back.
The in-process engine calls the clients simulated here directly, all clients of a step in one call
(:class:`LocalSplitExchange`); the Flower engine sends messages (``fedssl.engines.flower.split``).
Everything else is here, once:

- the step's active clients (:func:`step_clients`, drawn from ONE generator seeded by round; with a fleet, less
  the clients that are not reachable this round, :func:`round_members`, and those whose own part of the
  round would exceed ``devices.round_deadline_s``, :func:`late_clients`: they sit the round out);
- which client receives the latest client-nets with its forward (it does not hold them);
- what is never used: a client that sent nothing back (``failed``), or activations / client-nets that
  do not fit or hold NaN/inf (``rejected``); the round goes on without them;
- the ledger: per client and round the activation, gradient and weight payload bytes (and, where the
  engine measured them, the bytes of the messages on the wire beside them); the round's metrics row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from fedssl.config import RunConfig, SplitConfig
from fedssl.data.datasets import ImageData
from fedssl.devices.clock import split_client_round_time, split_cost
from fedssl.devices.fleet import available, fleet_of
from fedssl.engines.observer import Observer, note
from fedssl.errors import DivergedError
from fedssl.methods.base import Payload
from fedssl.methods.split import SplitClients, SplitMethod, Stacked, StepTask
from fedssl.resources import DOWNLOAD, SERVER_ID, SERVER_STEP_COST, UPLOAD, Ledger, payload_bytes, tensor_bytes
from fedssl.training import derive_seed, round_lr

STEP_CLIENTS_SEED = 0x5F2


def step_clients(split: SplitConfig, num_clients: int, generator: torch.Generator) -> Tensor:
    """The step's clients (ascending): ``clients_per_step`` of them drawn uniformly, or every client."""
    k = max(1, round(split.clients_per_step * num_clients))
    if k >= num_clients:
        return torch.arange(num_clients)
    return torch.randperm(num_clients, generator=generator)[:k].sort().values


@dataclass
class Arrivals:
    """What came back from the clients of one exchange: the answers stacked (client order), and who failed."""

    clients: Tensor  # (m,) the clients that answered, ascending
    payload: Stacked  # name -> (m, ...)
    failed: dict[int, str] = field(default_factory=dict)  # client -> why nothing usable came
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why its answer does not fit
    wire_down: dict[int, int] | None = None  # client -> bytes of the messages as sent (None: nothing travels)
    wire_up: dict[int, int] | None = None


class SplitExchange(Protocol):
    """How an engine reaches the clients of a split round (see :class:`LocalSplitExchange`)."""

    def forward(self, task: StepTask, latest: Payload, fetch: Tensor) -> Arrivals:
        """The task's clients' activations; the clients ``fetch`` (n,) bool first take ``latest``."""

    def backward(self, task: StepTask, gradient: Stacked) -> Arrivals:
        """Each client's slice of the server's gradient; it updates its client-nets."""

    def sync(self, round_index: int, clients: Tensor) -> Arrivals:
        """The clients' (n,) client-nets."""

    def send_average(self, round_index: int, clients: Tensor, average: Payload) -> Arrivals:
        """The sync's average to the clients (n,) whose nets went into it."""


class LocalSplitExchange:
    """The in-process exchange: direct calls on the clients simulated here, all clients of a step in one call."""

    def __init__(self, clients: SplitClients, client_data: Callable[[int], ImageData]) -> None:
        self.clients = clients
        clients.use_data(client_data)

    def forward(self, task: StepTask, latest: Payload, fetch: Tensor) -> Arrivals:
        if bool(fetch.any()):
            self.clients.receive(task.clients[fetch], latest)
        return Arrivals(task.clients, self.clients.forward(task))

    def backward(self, task: StepTask, gradient: Stacked) -> Arrivals:
        self.clients.backward(task, gradient)
        return Arrivals(task.clients, {})

    def sync(self, round_index: int, clients: Tensor) -> Arrivals:
        return Arrivals(clients, self.clients.upload(clients))

    def send_average(self, round_index: int, clients: Tensor, average: Payload) -> Arrivals:
        self.clients.receive(clients, average)
        return Arrivals(clients, {})


def stack_rows(rows: dict[int, Payload], like: Payload) -> Arrivals:
    """Per-client answers -> :class:`Arrivals`: those whose keys and shapes fit ``like`` (one client's) stacked."""
    fitting, rejected = [], {}
    for client in sorted(rows):
        payload = rows[client]
        wrong = sorted(set(payload) ^ set(like))[:3]
        shape = next((k for k in like if k in payload and payload[k].shape != like[k].shape), None)
        if wrong or shape:
            rejected[client] = f"keys {wrong} differ" if wrong else f"{shape} has shape {tuple(payload[shape].shape)}"
            continue
        fitting.append(client)
    stacked = {k: torch.stack([rows[c][k] for c in fitting]) if fitting else torch.empty(0, *like[k].shape)
               for k in like}
    return Arrivals(torch.tensor(fitting, dtype=torch.long), stacked, rejected=rejected)


def usable(arrivals: Arrivals, like: Payload) -> tuple[Tensor, Stacked]:
    """The arrived clients whose tensors fit ``like`` (one client's) and are finite, and their rows."""
    if not len(arrivals.clients):
        return arrivals.clients, arrivals.payload
    if set(arrivals.payload) != set(like) or any(arrivals.payload[k].shape[1:] != like[k].shape for k in like):
        arrivals.rejected.update({int(c): "answers that do not fit the model" for c in arrivals.clients})
        return arrivals.clients[:0], {}
    finite = torch.stack([torch.isfinite(t.flatten(1)).all(dim=1) for t in arrivals.payload.values()]).all(dim=0)
    if bool(finite.all()):
        return arrivals.clients, arrivals.payload
    arrivals.rejected.update({int(c): "NaN or inf in its answer" for c in arrivals.clients[~finite]})
    return arrivals.clients[finite], {k: v[finite] for k, v in arrivals.payload.items()}


class Traffic:
    """Per client, one round's payload bytes by kind, the bytes of the messages on the wire, and its faults."""

    KINDS = ("activations_up", "weights_up", "gradients_down", "weights_down", "wire_up", "wire_down")

    def __init__(self, num_clients: int) -> None:
        self.bytes = {kind: torch.zeros(num_clients, dtype=torch.long) for kind in self.KINDS}
        self.contacted = torch.zeros(num_clients, dtype=torch.bool)
        self.wired = False
        self.failed: dict[int, str] = {}
        self.rejected: dict[int, str] = {}

    def add(self, kind: str, clients: Tensor, each: int) -> None:
        self.bytes[kind][clients] += int(each)
        self.contacted[clients] = True

    def arrived(self, arrivals: Arrivals) -> None:
        """Wire bytes and faults of one exchange."""
        for direction, values in (("wire_down", arrivals.wire_down), ("wire_up", arrivals.wire_up)):
            if values is not None:
                self.wired = True
                for client, size in values.items():
                    self.bytes[direction][client] += int(size)
        self.failed.update(arrivals.failed)
        self.rejected.update(arrivals.rejected)


def _row_bytes(payload: Stacked) -> int:
    """Bytes of one client's row of a stacked payload."""
    return sum(tensor_bytes(t[0]) for t in payload.values()) if payload else 0


def _lost(method: SplitMethod, arrivals: Arrivals) -> None:
    """A client that did not answer may have lost its state: it receives the nets again."""
    for client in arrivals.failed:
        method.client_lost(client)


@dataclass
class _Round:
    """What a round accumulates between its steps."""

    served: Tensor  # (N,) steps each client took
    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0


def split_round(method: SplitMethod, cfg: RunConfig, round_index: int, exchange: SplitExchange, ledger: Ledger,
                observer: Observer) -> dict[str, Any]:
    """One round of a split method: ``sync_every`` steps over ``exchange``, then the sync; the round's metrics row."""
    n = method.num_clients
    observer.round_started(round_index, n)
    start = time.perf_counter()
    traffic, state = Traffic(n), _Round(torch.zeros(n, dtype=torch.long))
    latest = method.latest()
    members = round_members(cfg, method.split, round_index, n)
    late = late_clients(method, cfg, members, ledger)
    if late:
        members = [clients[~torch.isin(clients, torch.tensor(late))] for clients in members]
    for step, clients in enumerate(members):
        if not len(clients):
            continue  # no client of this step is reachable
        task = StepTask(round_index, step, clients, state.served[clients])
        _step(method, cfg, task, latest, exchange, traffic, state, ledger)
    participants = torch.nonzero(state.served).flatten()
    if len(participants):
        sync_clients(method, round_index, exchange, participants, traffic)
    row = _record(method, round_index, traffic, state, ledger, observer, time.perf_counter() - start)
    if cfg.devices.mix:
        row.update(unavailable=n - int(reachable(cfg, round_index, n).sum()), late=len(late))
        for client in late:  # sent nothing, sent back nothing: the ledger says why
            ledger.record(round=round_index, client=client, kind=DOWNLOAD, bytes=0, late=1)
    return row


def late_clients(method: SplitMethod, cfg: RunConfig, members: list[Tensor], ledger: Ledger) -> list[int]:
    """The clients whose own part of the round (their steps in ``members`` and the sync, on their profile:
    :func:`~fedssl.devices.clock.split_client_round_time`) would exceed ``devices.round_deadline_s``."""
    fleet = fleet_of(cfg, method.num_clients)
    if fleet is None or not fleet.deadline_s:
        return []
    steps = torch.bincount(torch.cat(members), minlength=method.num_clients) if members else torch.zeros(0)
    cost, net = split_cost(ledger.rows), payload_bytes(method.latest())
    act, grad = payload_bytes(method.activations_like()), payload_bytes(method.gradient_like())
    late = []
    for client in torch.nonzero(steps).flatten().tolist():
        fetch = 0 if bool(method.holds_latest[client]) else net  # the nets that ride on its first forward
        time = split_client_round_time(fleet.profile(client), cost, steps=int(steps[client]),
                                       images_per_step=method.split.client_batch, activation_bytes=act,
                                       gradient_bytes=grad, net_bytes_up=net, net_bytes_down=net + fetch)
        if time.total_s > fleet.deadline_s:
            late.append(client)
    return late


def reachable(cfg: RunConfig, round_index: int, num_clients: int) -> Tensor:
    """(N,) bool: the clients reachable this round (all of them without a fleet; else by their availability)."""
    fleet = fleet_of(cfg, num_clients)
    return torch.tensor([available(cfg, fleet, round_index, c) for c in range(num_clients)], dtype=torch.bool)


def round_members(cfg: RunConfig, split: SplitConfig, round_index: int, num_clients: int) -> list[Tensor]:
    """The clients of each of the round's ``split.sync_every`` steps (ascending): drawn by :func:`step_clients`
    from the round's generator, less those not reachable this round (:func:`reachable`)."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, round_index, STEP_CLIENTS_SEED))
    steps = [step_clients(split, num_clients, generator) for _ in range(split.sync_every)]
    if not cfg.devices.mix:
        return steps
    here = reachable(cfg, round_index, num_clients)
    return [clients[here[clients]] for clients in steps]


def _step(method: SplitMethod, cfg: RunConfig, task: StepTask, latest: Payload, exchange: SplitExchange,
          traffic: Traffic, state: _Round, ledger: Ledger) -> None:
    """Forward, server step, backward of one step's clients; the clients whose activations fit took the step."""
    fetch = ~method.holds_latest[task.clients]
    arrivals = exchange.forward(task, latest, fetch)
    traffic.add("weights_down", task.clients[fetch], payload_bytes(latest))
    traffic.arrived(arrivals)
    _lost(method, arrivals)
    method.holds_latest[arrivals.clients] = True  # they took the nets that came with the forward
    traffic.add("activations_up", arrivals.clients, _row_bytes(arrivals.payload))
    clients, activations = usable(arrivals, method.activations_like())
    if not len(clients):
        return
    if task.round == 0 and not any(r["kind"] == SERVER_STEP_COST for r in ledger.rows):
        cost = method.measure_server_step(activations, clients)
        ledger.record(round=0, client=SERVER_ID, kind=SERVER_STEP_COST, **cost.as_dict())
    result = method.server_step(activations, clients, round_lr(cfg, task.round))
    if not math.isfinite(result.loss):
        raise DivergedError(f"the {method.name} loss became {result.loss}; lower the learning rate (--set lr=...)")
    taken = StepTask(task.round, task.step, clients, state.served[clients])
    back = exchange.backward(taken, result.gradient)
    traffic.add("gradients_down", clients, _row_bytes(result.gradient))
    traffic.arrived(back)
    _lost(method, back)
    state.served[clients] += 1
    state.loss_sum, state.steps = state.loss_sum + result.loss, state.steps + 1
    state.images += int(next(iter(activations.values())).shape[:2].numel())


def sync_clients(method: SplitMethod, round_index: int, exchange: SplitExchange, participants: Tensor,
                 traffic: Traffic | None = None) -> Tensor:
    """The participants' (n,) client-nets up; their average, the new latest, down to those whose nets went into it.

    Returns the clients whose nets were averaged.
    """
    traffic = traffic or Traffic(method.num_clients)
    arrivals = exchange.sync(round_index, participants)
    traffic.arrived(arrivals)
    _lost(method, arrivals)
    traffic.add("weights_up", arrivals.clients, _row_bytes(arrivals.payload))
    synced, nets = usable(arrivals, method.latest())
    if not len(synced):
        return synced
    average = method.average(nets)
    method.holds_latest.zero_()  # the average is new to everyone ...
    back = exchange.send_average(round_index, synced, average)
    traffic.add("weights_down", synced, payload_bytes(average))
    traffic.arrived(back)
    _lost(method, back)
    method.holds_latest[back.clients] = True  # ... but to the clients that received it
    return synced


def _record(method: SplitMethod, round_index: int, traffic: Traffic, state: _Round, ledger: Ledger,
            observer: Observer, seconds: float) -> dict[str, Any]:
    """Ledger rows per client (payload bytes by kind, + wire bytes where measured) and the round's metrics row."""
    batch, b = method.split.client_batch, {kind: values.tolist() for kind, values in traffic.bytes.items()}
    served = state.served.tolist()
    up = down = 0
    for c in torch.nonzero(traffic.contacted).flatten().tolist():
        up_c, down_c = b["activations_up"][c] + b["weights_up"][c], b["gradients_down"][c] + b["weights_down"][c]
        wire_up = {"wire_bytes": b["wire_up"][c]} if traffic.wired else {}
        wire_down = {"wire_bytes": b["wire_down"][c]} if traffic.wired else {}
        ledger.record(round=round_index, client=c, kind=UPLOAD, bytes=up_c, activation_bytes=b["activations_up"][c],
                      weight_bytes=b["weights_up"][c], steps=served[c], samples=served[c] * batch,
                      images=served[c] * batch, **wire_up)
        ledger.record(round=round_index, client=c, kind=DOWNLOAD, bytes=down_c, gradient_bytes=b["gradients_down"][c],
                      weight_bytes=b["weights_down"][c], steps=served[c], **wire_down)
        up, down = up + up_c, down + down_c
        observer.client_done(round_index, c, {"images": served[c] * batch, "bytes_up": up_c, "bytes_down": down_c,
                                              **({"failed": 1} if c in traffic.failed else {})})
    for c in sorted(set(traffic.failed) | set(traffic.rejected)):
        what = (f"failed ({traffic.failed[c]})" if c in traffic.failed
                else f"sent an answer that does not fit ({traffic.rejected[c]}; rejected)")
        note(observer, f"round {round_index + 1}: client {c} {what}; the round went on without it")
    row = {"round": round_index + 1, "loss": state.loss_sum / state.steps if state.steps else float("nan"),
           "clients": int((state.served > 0).sum()), "failed": len(traffic.failed), "rejected": len(traffic.rejected),
           "images": state.images, "seconds": seconds, "images_per_s": state.images / seconds if seconds > 0 else 0.0,
           "bytes_up": up, "bytes_down": down, "steps": state.steps}
    if traffic.wired:
        row.update(wire_up=int(traffic.bytes["wire_up"].sum()), wire_down=int(traffic.bytes["wire_down"].sum()))
    return row
