"""The server's side of the Flower engine: which runs it takes, and its rounds over the Grid.

:class:`FlowerRunner` plugs into the shared run loop (``fedssl.engines.loop.execute``): a round is
the in-process engine's (``fedssl.engines.rounds.federated_round`` for round-based methods,
``fedssl.engines.steps.split_round`` for split methods) with the exchange done by messages
(:func:`round_exchange` here, ``fedssl.engines.flower.secagg.secure_exchange`` under ``flower.secagg``,
``fedssl.engines.flower.split.FlowerSplitExchange``) through the :class:`~fedssl.engines.flower.link.Link`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from fedssl.config import RunConfig
from fedssl.engines.flower.link import Link, Request
from fedssl.engines.flower.messages import PAYLOAD, RESULT, TRAIN, UPLOAD, from_record, to_record
from fedssl.engines.flower.secagg import secure_exchange
from fedssl.engines.flower.split import FlowerSplitExchange
from fedssl.engines.observer import Observer
from fedssl.engines.rounds import Exchange, Reply, federated_round
from fedssl.engines.steps import split_round
from fedssl.errors import FedSSLError
from fedssl.methods import METHODS
from fedssl.methods.base import ClientResult, FederatedMethod, Method, Payload
from fedssl.methods.split import SplitMethod
from fedssl.resources import Ledger


def num_partitions(cfg: RunConfig) -> int:
    """Clients (= SuperNodes) of a run: one per partition."""
    return 1 if METHODS[cfg.method].pooled_data else cfg.clients


def check_flower_config(cfg: RunConfig) -> None:
    """A config the Flower engine cannot run, refused with the fix."""
    if METHODS[cfg.method].pooled_data:
        raise FedSSLError(f"{cfg.method} is the single-machine ceiling (one participant holds all data, nothing is "
                          "exchanged), so there is nothing to federate; run it with --engine local")


# ------------------------------------------------------------------ round-based methods


def round_exchange(link: Link, cfg: RunConfig) -> Exchange:
    """``federated_round``'s exchange over Flower: a ``train`` message per client, its reply as a ClientResult."""
    def exchange(round_index: int, sends: Iterable[tuple[int, Payload]]) -> Iterator[Reply]:
        requests = [Request(client, TRAIN, {"round": round_index, "client": client}, {PAYLOAD: to_record(payload)})
                    for client, payload in sends]
        for response in link.exchange(requests, cfg.flower.round_timeout):
            result, failure = None, response.failure
            if response.reply is not None:
                try:
                    result = client_result(response.client, response.reply.content)
                except (KeyError, TypeError, ValueError) as err:
                    failure = f"unreadable reply ({type(err).__name__}: {err})"
            yield Reply(response.client, result, failure, response.wire_down, response.wire_up)
    return exchange


def client_result(client: int, reply: RecordDict) -> ClientResult:
    """A ``train`` reply's content -> the ClientResult the method aggregates."""
    upload: ArrayRecord = reply[UPLOAD]
    metrics = {k: v for k, v in reply[RESULT].items()}
    num_samples = metrics.pop("num-samples")
    return ClientResult(client, from_record(upload), num_samples, metrics)


class FlowerRunner:
    """The rounds of the shared run loop over Flower's Grid (simulation or deployment alike)."""

    def __init__(self, grid: Grid, cfg: RunConfig, observer: Observer) -> None:
        check_flower_config(cfg)
        self.cfg = cfg
        self.link = Link(grid, cfg, observer)
        self.clients = num_partitions(cfg)

    def begin(self, method: Method, resumed: bool) -> None:
        """A new Flower run: no node holds anything of an earlier run (a fresh one holds the seeded start)."""
        if resumed or isinstance(method, FederatedMethod):
            method.client_lost(None)
        self.link.discover(self.clients, self.cfg.flower.connect_timeout)

    def run_round(self, method: Method, round_index: int, ledger: Ledger, observer: Observer) -> dict[str, Any]:
        for client in self.link.refresh():  # a client on a new node holds nothing of this run
            method.client_lost(client)
        if isinstance(method, SplitMethod):
            exchange = FlowerSplitExchange(self.link, method)
            row = split_round(method, self.cfg, round_index, exchange, ledger, observer)
            return {**row, **exchange.timing(row["steps"], row["seconds"])}
        if not isinstance(method, FederatedMethod):
            raise FedSSLError(f"{method.name} has no Flower messages; run it with --engine local")
        exchange = secure_exchange(self.link, self.cfg, method) if self.cfg.flower.secagg else \
            round_exchange(self.link, self.cfg)
        return federated_round(method, self.cfg, round_index, self.clients, exchange, ledger, observer)
