"""The step-level protocol of split learning: what crosses the cut, the client role and the server role.

A round of a split method is one synchronisation period: ``sync_every`` steps, then a sync.
A step, for the step's active clients:

1. forward (client role, :meth:`SplitClients.forward`): each client computes its activations
   at the cut, which go up;
2. server step (server role, :meth:`SplitMethod.server_step`): the activations of all clients
   are concatenated into one batch; the server runs its layers and its loss, updates itself and
   returns the gradient w.r.t. each client's activations;
3. backward (client role, :meth:`SplitClients.backward`): each client back-propagates its slice
   of the gradient and updates its client-net;

and the sync: the clients that took part upload their client-nets (:meth:`SplitClients.upload`),
the server averages them (:meth:`SplitMethod.average`) and the average goes back down to them
(:meth:`SplitClients.receive`). A client that does not hold the latest average (it sat the last
sync out, or lost its state) receives it with its next forward.

ONE driver runs this, ``fedssl.engines.steps.split_round``; an engine supplies only the
exchange (in-process: direct calls on the clients simulated here; Flower: messages). Every
tensor that crosses the cut is a :data:`Stacked` payload: one row per client of the exchange,
so that the in-process engine runs all clients of a step in one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedssl.config import SplitConfig
from fedssl.data.datasets import ImageData
from fedssl.methods.base import Method, MethodContext, Payload
from fedssl.resources import StepCost

Stacked = dict[str, Tensor]  # name -> (n, ...): row i belongs to the i-th client of the exchange


@dataclass(frozen=True)
class StepTask:
    """One step of a round for a group of clients."""

    round: int
    step: int
    clients: Tensor  # (n,) client ids, ascending
    served: Tensor  # (n,) batches each of them already took this round: its next batch is the served-th


class SplitClients(ABC):
    """The client role of a split method for the clients ONE machine holds (a Flower node: one; the
    in-process engine: all of them, as stacks). What a client keeps between steps and rounds is its own
    (client-nets, optimizer state); its images never leave it."""

    @abstractmethod
    def use_data(self, client_data: Callable[[int], ImageData]) -> None:
        """The images of the clients held here: ``client_data(client_id)``."""

    @abstractmethod
    def receive(self, clients: Tensor, nets: Payload) -> None:
        """The clients (n,) take the server's client-nets (the latest average)."""

    @abstractmethod
    def forward(self, task: StepTask) -> Stacked:
        """The task's clients' activations at the cut: what goes up."""

    @abstractmethod
    def backward(self, task: StepTask, gradient: Stacked) -> None:
        """The server's gradient of the task's activations: back-propagate, update the client-nets."""

    @abstractmethod
    def upload(self, clients: Tensor) -> Stacked:
        """The clients' client-nets, for the sync."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ServerStep:
    """The server's reply to one step: its loss and the gradient of each client's activations (n, ...)."""

    loss: float
    gradient: Stacked


class SplitMethod(Method):
    """A step-based split-learning method: its server role, and the clients simulated in this process.

    ``clients``: the client role of every client this process simulates (the in-process engine trains
    them; on a Flower server they stay untouched: each node builds its own with :meth:`build_clients`).
    ``holds_latest[c]``: the server knows client c holds the latest average (nothing to send with its next
    forward); every client starts with the seeded initial client-net, which is the server's too.
    """

    dp_refusal = ("sends activations and receives gradients every step (split learning), which DP-FedAvg's per-round "
                  "clipping of one model update does not bound")

    split: SplitConfig  # the split settings in force
    num_clients: int
    clients: SplitClients
    holds_latest: Tensor  # (num_clients,) bool
    version: int  # averages made so far (0: the seeded initial client-net)

    @classmethod
    @abstractmethod
    def build_clients(cls, ctx: MethodContext, ids: Sequence[int]) -> SplitClients:
        """The client role of the clients ``ids`` on one machine, built from the config alone."""

    @abstractmethod
    def latest(self) -> Payload:
        """The server's latest averaged client-nets: what a client that lacks them receives."""

    @abstractmethod
    def activations_like(self) -> Payload:
        """One client's activations of one step (keys, shapes, dtypes): what a valid forward reply holds."""

    @abstractmethod
    def server_step(self, activations: Stacked, clients: Tensor, lr: float) -> ServerStep:
        """Concatenate the clients' (n,) activations, run the server's layers and loss, update; the gradients."""

    @abstractmethod
    def average(self, nets: Stacked) -> Payload:
        """FedAvg of the uploaded client-nets (n, ...): it becomes :meth:`latest`; returns it."""

    @abstractmethod
    def measure_server_step(self, activations: Stacked, clients: Tensor) -> StepCost:
        """One real server step on a copy (no side effects), measured."""

    def gradient_like(self) -> Payload:
        """One client's gradient of one step (what the server sends down; the simulated clock's prediction of a
        round): by default shaped like its activations."""
        return self.activations_like()

    def client_lost(self, client_id: int | None) -> None:
        """The client's state may be gone (None: every client's, a new Flower run): it must receive the nets again."""
        if client_id is None:
            self.holds_latest.zero_()
        else:
            self.holds_latest[client_id] = False
