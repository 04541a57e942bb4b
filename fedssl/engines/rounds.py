"""The round logic both engines share: which clients take part, what is recorded, what is aggregated.

A round of a round-based method (``FederatedMethod``) is the same whichever engine
runs it; only the *exchange* differs: how a client's download reaches it and how its
reply comes back. The in-process engine calls the method's client role (``method.client.train``)
directly (:func:`local_exchange`); the Flower engine sends messages through the Grid
(``fedssl.engines.flower.server``). Everything else is here, once:

- client sampling (:func:`sample_clients`) and simulated dropout (:func:`returns_update`);
- with a fleet (``[devices]``): clients that are not reachable this round (their profile's availability,
  ``unavailable``: nothing is sent to them) and those whose simulated time exceeds ``devices.round_deadline_s``
  (``late``: they trained, their upload is never sent);
- the ledger: payload bytes down/up per client (and, where the engine measured
  them, the bytes of the messages on the wire beside them);
- what is never averaged in: a client that sent nothing back (``failed``: no reply
  in time, or its ClientApp raised) or a reply that does not fit the model
  (``rejected``: wrong keys or shapes, NaN/inf; :func:`fedssl.aggregation.check_upload`);
- the round's metrics row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedssl.aggregation import check_upload
from fedssl.config import RunConfig, clients_per_round
from fedssl.data.datasets import ImageData
from fedssl.devices.clock import exchange_time, step_flops
from fedssl.devices.fleet import Fleet, available, fleet_of
from fedssl.engines.observer import Observer, note
from fedssl.methods.base import ClientResult, FederatedMethod, Payload
from fedssl.resources import DOWNLOAD, UPLOAD, Ledger, payload_bytes
from fedssl.training import derive_seed


def sample_clients(cfg: RunConfig, round_index: int, num_clients: int) -> list[int]:
    """The clients of a round: ceil(fraction * N), uniformly without replacement, seeded by round."""
    k = clients_per_round(cfg.sample_fraction, num_clients)
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(cfg.seed, round_index, 0x5A))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def returns_update(cfg: RunConfig, round_index: int, client_id: int) -> bool:
    """Whether a sampled client's update arrives (``dropout``: it fails with that probability, seeded)."""
    if cfg.dropout == 0:
        return True
    rng = np.random.default_rng(derive_seed(cfg.seed, round_index, client_id, 0xD0))
    return bool(rng.random() >= cfg.dropout)


@dataclass
class Reply:
    """What came back from one client of a round: its result, or why nothing came back.

    ``wire_down`` / ``wire_up``: bytes of the messages as the engine sent them (Flower: the
    serialised message); None where nothing travels (the in-process engine).
    """

    client: int
    result: ClientResult | None
    failure: str = ""  # result is None: why (no reply in time, the ClientApp raised ...)
    wire_down: int | None = None
    wire_up: int | None = None


# (round index, the (client, download payload) pairs to deliver) -> the replies, in any order
Exchange = Callable[[int, Iterable[tuple[int, Payload]]], Iterator[Reply]]


def local_exchange(method: FederatedMethod, client_data: Callable[[int], ImageData]) -> Exchange:
    """The in-process exchange: each client's local training runs here, one client after another."""
    def exchange(round_index: int, sends: Iterable[tuple[int, Payload]]) -> Iterator[Reply]:
        for client, payload in sends:
            yield Reply(client, method.client.train(payload, client_data(client), round_index=round_index,
                                                    client_id=client))
    return exchange


def _weighted_loss(results: list[ClientResult]) -> float:
    steps = sum(r.metrics.get("steps", 0) for r in results)
    if not steps:
        return float("nan")
    return sum(r.metrics["loss"] * r.metrics["steps"] for r in results if r.metrics.get("steps")) / steps


def _wire(reply: Reply, direction: str) -> dict[str, int]:
    value = reply.wire_down if direction == "down" else reply.wire_up
    return {} if value is None else {"wire_bytes": int(value)}


def federated_round(method: FederatedMethod, cfg: RunConfig, round_index: int, num_clients: int,
                    exchange: Exchange, ledger: Ledger, observer: Observer) -> dict[str, Any]:
    """One round: download, local training (through ``exchange``), checks, upload, aggregation.

    Returns the round's metrics row. ``dropped`` counts the clients the ``dropout`` setting made
    fail after their download; ``failed`` those the engine got nothing from; ``rejected`` those
    whose reply did not fit the model; with a fleet, ``unavailable`` and ``late`` (see the module's
    docstring). Only the others are aggregated, in client order.
    """
    clients = [0] if method.pooled_data else sample_clients(cfg, round_index, num_clients)
    fleet, flops_per_image = fleet_of(cfg, num_clients), step_flops(ledger.rows, round_index=round_index)
    observer.round_started(round_index, len(clients))
    start = time.perf_counter()
    sent: dict[int, int] = {}  # client -> payload bytes of its download
    counts = {"dropped": 0, "failed": 0, "rejected": 0, "up": 0, "down": 0, "wire_up": 0, "wire_down": 0, "late": 0,
              "unavailable": 0}
    wired = False

    def downloads() -> Iterator[tuple[int, Payload]]:
        for client in clients:
            if not available(cfg, fleet, round_index, client):
                counts["unavailable"] += 1  # not reachable this round: nothing is sent
                observer.client_done(round_index, client, {"unavailable": 1})
                continue
            payload = method.download(round_index, client)
            sent[client] = payload_bytes(payload)
            counts["down"] += sent[client]
            if returns_update(cfg, round_index, client):
                yield client, payload
                continue
            counts["dropped"] += 1  # the client received the model, then failed: nothing comes back
            method.client_lost(client)  # ... and whatever it was sent may be gone with it
            ledger.record(round=round_index, client=client, kind=DOWNLOAD, bytes=sent[client])
            observer.client_done(round_index, client, {"bytes_down": sent[client], "dropped": 1})

    results: list[ClientResult] = []
    for reply in exchange(round_index, downloads()):
        wired = wired or reply.wire_down is not None
        if is_late(fleet, flops_per_image, reply, sent[reply.client]):
            _late(round_index, reply, sent[reply.client], counts, ledger, observer)
            continue
        result = _take(method, round_index, reply, sent[reply.client], counts, ledger, observer)
        if result is not None:
            results.append(result)
    results.sort(key=lambda r: r.client_id)  # the aggregation's float sums in one order, whatever the arrivals
    if results:
        method.aggregate(round_index, results)
    seconds = time.perf_counter() - start
    images = int(sum(r.metrics.get("images", 0) for r in results))
    row = {"round": round_index + 1, "loss": _weighted_loss(results), "clients": len(clients),
           "dropped": counts["dropped"], "failed": counts["failed"], "rejected": counts["rejected"],
           "images": images, "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0,
           "bytes_up": counts["up"], "bytes_down": counts["down"]}
    if wired:
        row.update(wire_up=counts["wire_up"], wire_down=counts["wire_down"])
    if fleet is not None:
        row.update(late=counts["late"], unavailable=counts["unavailable"])
    if cfg.privacy.enabled:
        row.update(privacy_columns(cfg, round_index, results))
    return row


def privacy_columns(cfg: RunConfig, round_index: int, results: list[ClientResult]) -> dict[str, float]:
    """A DP round's columns: ``epsilon`` (at ``privacy.delta``) after this round, and ``clipped``: the clients whose
    update the clip bound scaled down (as they reported it: like the loss, a statistic outside the guarantee)."""
    from fedssl.privacy.accountant import run_epsilon  # dp-accounting: imported by DP runs only

    return {"epsilon": run_epsilon(cfg, round_index + 1),
            "clipped": int(sum(r.metrics.get("clipped", 0) for r in results))}


def is_late(fleet: Fleet | None, flops_per_image: float, reply: Reply, down: int) -> bool:
    """Whether a client's simulated time this round (RTT + download + training + upload on its profile) exceeds
    the fleet's deadline (never without a fleet, a deadline or a result)."""
    if fleet is None or not fleet.deadline_s or reply.result is None:
        return False
    images = float(reply.result.metrics.get("images", 0))
    time = exchange_time(fleet.profile(reply.client), flops=flops_per_image * images, bytes_down=down,
                         bytes_up=payload_bytes(reply.result.upload))
    return time.total_s > fleet.deadline_s


def _late(round_index: int, reply: Reply, down: int, counts: dict[str, int], ledger: Ledger,
          observer: Observer) -> None:
    """A late client: it received and trained (its images and download are recorded), its upload is never sent."""
    assert reply.result is not None
    images = int(reply.result.metrics.get("images", 0))
    counts["late"] += 1
    counts["wire_down"] += reply.wire_down or 0
    ledger.record(round=round_index, client=reply.client, kind=DOWNLOAD, bytes=down, late=1, images=images,
                  **_wire(reply, "down"))
    observer.client_done(round_index, reply.client, {"bytes_down": down, "late": 1})


def _take(method: FederatedMethod, round_index: int, reply: Reply, down: int, counts: dict[str, int], ledger: Ledger,
          observer: Observer) -> ClientResult | None:
    """Record one reply (ledger, counts, observer); its result if it may be aggregated, else None (and why)."""
    client = reply.client
    counts["wire_down"] += reply.wire_down or 0
    ledger.record(round=round_index, client=client, kind=DOWNLOAD, bytes=down, **_wire(reply, "down"))
    if reply.result is None:
        counts["failed"] += 1
        method.client_lost(client)
        note(observer, f"round {round_index + 1}: client {client} failed ({reply.failure}); "
                        "left out of the aggregation")
        observer.client_done(round_index, client, {"bytes_down": down, "failed": 1})
        return None
    result = reply.result
    up = payload_bytes(result.upload)
    counts["up"] += up
    counts["wire_up"] += reply.wire_up or 0
    problem = check_upload(result.upload, method.expected_upload(round_index), result.num_samples)
    ledger.record(round=round_index, client=client, kind=UPLOAD, bytes=up, samples=result.num_samples,
                  steps=int(result.metrics.get("steps", 0)), images=int(result.metrics.get("images", 0)),
                  **_wire(reply, "up"),
                  **({"rejected": 1} if problem else {}))
    if problem:
        counts["rejected"] += 1
        method.client_lost(client)
        note(observer, f"round {round_index + 1}: rejected the upload of client {client} ({problem}); "
                        "never averaged in")
        observer.client_done(round_index, client, {"bytes_down": down, "bytes_up": up, "rejected": 1})
        return None
    observer.client_done(round_index, client, {**result.metrics, "bytes_up": up, "bytes_down": down})
    return result
