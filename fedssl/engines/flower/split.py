"""MocoSFL over Flower: the per-step exchange as messages, the client's state kept on its node.

Per step, for the step's active clients (drawn as in-process):

1. ``train.forward``: the client computes the query and key activations of its batch
   at the cut (``MocoSFLClient.forward``) and sends them up; the message carries the
   latest averaged client-nets if the client does not hold them yet;
2. the server concatenates them and runs ONE server step (``MocoSFL.server_step``);
3. ``train.backward``: each client gets its slice of the gradient, recomputes its
   query from the same seeded views, back-propagates, steps its SGD and EMA
   (``MocoSFLClient.backward``) and keeps its nets in ``context.state``;

and at the end of the round (``sync_every`` steps) ``train.sync``: the clients that
took part upload their nets; the server averages them (``MocoSFL.sync``) and every
client fetches the average with its next forward. A client that fails a message
loses that step (or its place in the average); the round goes on without it.

The ledger records per client and round the real activation, gradient and weight
payload bytes, and the bytes of the messages on the wire beside them. Unlike the
in-process engine (one shuffle of all clients' rows per round), each client here
shuffles its own images: the metrics follow the same method, not the same numbers.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from torch import Tensor, nn

from fedssl.config import RunConfig
from fedssl.engines.flower import node
from fedssl.engines.flower.messages import (BACKWARD, FORWARD, RESULT, SYNC, TASK, content, from_record, metrics_record,
                                           to_record)
from fedssl.engines.flower.server import Link, Request, Response
from fedssl.engines.local import Observer
from fedssl.engines.rounds import note
from fedssl.errors import DivergedError, FedSSLError
from fedssl.methods.base import MethodContext
from fedssl.methods.mocosfl import MocoSFL, MocoSFLClient
from fedssl.models.stacked import Stack, scatter_, zeros_like_stack
from fedssl.resources import DOWNLOAD, SERVER_STEP_COST, UPLOAD, Ledger, payload_bytes, tensor_bytes
from fedssl.training import derive_seed, round_lr

NETS_STATE = "fedssl.split.nets"  # context.state: this client's online / momentum / SGD buffers
STEP_STATE = "fedssl.split.step"  # context.state: the step whose backward is awaited
ONLINE, MOMENTUM, ACTIVATIONS, GRADIENT = "online", "momentum", "activations", "gradient"
PARTS = (ONLINE, MOMENTUM, "sgd")


# ------------------------------------------------------------------ the client side (in the ClientApp)


@functools.lru_cache(maxsize=1)
def _split_client(cfg: RunConfig, setup: node.NodeSetup) -> MocoSFLClient:
    from fedssl.engines.local import resolve_device

    data = node.client_data(cfg, setup)
    return MocoSFLClient(MethodContext(cfg, data.info, resolve_device(cfg.device)), data, setup.partition_id)


def _nets(context: Context) -> dict[str, Stack]:
    """The client's nets as stacks of one client: {"online": ..., "momentum": ..., "sgd": ...} ({} if none)."""
    flat = node.held(context, NETS_STATE)
    nets: dict[str, Stack] = defaultdict(dict)
    for key, value in flat.items():
        part, name = key.split("/", 1)
        nets[part][name] = value.unsqueeze(0)
    return dict(nets)


def _keep_nets(context: Context, nets: dict[str, Stack]) -> None:
    node.keep(context, {f"{part}/{name}": t[0] for part, stack in nets.items() for name, t in stack.items()},
              NETS_STATE)


def _task(message_content: RecordDict, setup: node.NodeSetup) -> tuple[int, int, int]:
    task = message_content[TASK]
    if int(task["client"]) != setup.partition_id:
        raise FedSSLError(f"a message for client {task['client']} reached the node of client {setup.partition_id}")
    return int(task["round"]), int(task["step"]), int(task["served"])


def client_forward(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context) -> RecordDict:
    """Take the latest nets if they came, compute the step's activations, remember the step."""
    round_index, step, served = _task(message_content, setup)
    client = _split_client(cfg, setup)
    nets = _nets(context)
    if ONLINE in message_content:  # the latest averaged nets (the client was not holding them)
        online = {k: v.unsqueeze(0) for k, v in from_record(message_content[ONLINE]).items()}
        momentum = ({k: v.unsqueeze(0) for k, v in from_record(message_content[MOMENTUM]).items()}
                    if MOMENTUM in message_content else nets.get(MOMENTUM) or {k: v.clone() for k, v in online.items()})
        nets = {ONLINE: online, MOMENTUM: momentum, "sgd": nets.get("sgd") or zeros_like_stack(online)}
    if set(nets) != set(PARTS):
        raise FedSSLError("this client holds no client-net (its state was lost); the server re-sends it")
    query, key = client.forward(nets[ONLINE], nets[MOMENTUM], round_index, step, served)
    _keep_nets(context, nets)
    context.state[STEP_STATE] = ConfigRecord({"round": round_index, "step": step, "served": served})
    return content(**{ACTIVATIONS: to_record({"query": query[0], "key": key[0]})})


def client_backward(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context
                    ) -> RecordDict:
    """The gradient of the step's query: recompute, back-propagate, SGD step, EMA; keep the nets."""
    round_index, step, served = _task(message_content, setup)
    pending = context.state.config_records.get(STEP_STATE)
    if pending is None or (int(pending["round"]), int(pending["step"])) != (round_index, step):
        raise FedSSLError(f"a backward for round {round_index + 1} step {step} without its forward on this client")
    nets = _nets(context)
    grad = from_record(message_content[GRADIENT])["query"].unsqueeze(0)  # (1, B, ...)
    nets[ONLINE] = _split_client(cfg, setup).backward(nets[ONLINE], nets[MOMENTUM], nets["sgd"], grad, round_index,
                                                      step, served)
    _keep_nets(context, nets)
    del context.state[STEP_STATE]
    return content(**{RESULT: metrics_record({"steps": 1})})


def client_sync(cfg: RunConfig, setup: node.NodeSetup, message_content: RecordDict, context: Context) -> RecordDict:
    """The client-nets go up (online, and momentum when ``split.sync_momentum``)."""
    _task(message_content, setup)
    nets = _nets(context)
    if ONLINE not in nets:
        raise FedSSLError("this client holds no client-net to synchronise (its state was lost)")
    parts = [ONLINE] + ([MOMENTUM] if cfg.split.sync_momentum else [])
    return content(**{part: to_record({k: v[0] for k, v in nets[part].items()}) for part in parts})


# ------------------------------------------------------------------ the server side (in the ServerApp)


class SplitTraffic:
    """Per client, one round's bytes: payloads by kind, and the messages on the wire."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, client: int, **values: int) -> None:
        for key, value in values.items():
            self.rows[client][key] += int(value)


def _latest(method: MocoSFL) -> dict[str, dict[str, Tensor]]:
    """The averaged client-nets a client must hold (the global encoder's first layers, and their momentum copy)."""
    cut = method.cut
    out = {ONLINE: {k: v.detach().clone() for k, v in method.client_net.named_parameters()}}
    momentum = nn.Sequential(*method.server.momentum_encoder.layers[:cut])
    out[MOMENTUM] = {k: v.detach().clone() for k, v in momentum.named_parameters()}
    return out


def _activation_shape(method: MocoSFL) -> tuple[int, ...]:
    """(B, C', H', W'): what one client's activations at the cut must look like."""
    size, channels = method.ctx.image_size, method.ctx.info.channels
    with torch.no_grad():
        probe = method.client_net(torch.zeros(method.split.client_batch, channels, size, size, device=method.ctx.device))
    return tuple(probe.shape)


def _fits(tensors: dict[str, Tensor], like: dict[str, Tensor]) -> bool:
    return set(tensors) == set(like) and all(
        tensors[k].shape == like[k].shape and bool(torch.isfinite(tensors[k]).all()) for k in like)


def split_round(method: MocoSFL, link: Link, round_index: int, holds: dict[int, bool], ledger: Ledger,
                observer: Observer) -> dict[str, Any]:
    """One MocoSFL round (``sync_every`` steps, then the sync) over Flower messages; the round's metrics row.

    ``holds[c]``: client c holds the latest averaged nets (kept by the runner across rounds).
    """
    cfg, split, n = method.cfg, method.split, method.num_clients
    timeout = cfg.flower.round_timeout
    observer.round_started(round_index, n)
    start = time.perf_counter()
    lr = round_lr(cfg, round_index)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, round_index, 0x5F2))  # the steps' active clients
    latest = _latest(method)
    parts = [ONLINE, MOMENTUM] if split.sync_momentum else [ONLINE]
    latest_records = {part: to_record(latest[part]) for part in parts}  # serialised once, sent to every stale client
    shape = _activation_shape(method)
    traffic = SplitTraffic()
    served = torch.zeros(n, dtype=torch.long)
    failed: set[int] = set()
    rejected: set[int] = set()
    loss_sum, steps_done, images = 0.0, 0, 0
    for step in range(split.sync_every):
        active = method._active_clients(generator)
        clients = (active if active is not None else torch.arange(n)).tolist()
        requests = []
        for c in clients:
            nets = {} if holds.get(c) else latest_records
            requests.append(Request(c, FORWARD, {"round": round_index, "step": step, "served": int(served[c]),
                                                 "client": c}, nets))
            traffic.add(c, weights_down=sum(payload_bytes(latest[p]) for p in nets))
        ok: dict[int, dict[str, Tensor]] = {}
        for response in link.exchange(requests, timeout):
            c = response.client
            if not _answered(response, traffic, failed, holds):
                continue
            holds[c] = True  # it took the nets that came with the forward
            acts = from_record(response.reply.content[ACTIVATIONS])
            traffic.add(c, activations_up=payload_bytes(acts))
            if not _fits(acts, {"query": torch.empty(shape), "key": torch.empty(shape)}):
                rejected.add(c)
                continue
            ok[c] = acts
        if not ok:
            continue
        order = sorted(ok)
        index = torch.tensor(order)
        query = torch.stack([ok[c]["query"] for c in order]).to(method.ctx.device)  # (n_ok, B, ...)
        key = torch.stack([ok[c]["key"] for c in order]).to(method.ctx.device)
        if not any(r["kind"] == SERVER_STEP_COST for r in ledger.rows):
            method.record_server_cost(query, key, index, ledger)
        result = method.server_step(query, key, index, lr)
        if not math.isfinite(result.loss):
            raise DivergedError(f"the MocoSFL loss became {result.loss}; lower the learning rate (--set lr=...)")
        requests = [Request(c, BACKWARD, {"round": round_index, "step": step, "served": int(served[c]), "client": c},
                            {GRADIENT: to_record({"query": result.grad[j].cpu()})}) for j, c in enumerate(order)]
        for j, c in enumerate(order):
            traffic.add(c, gradients_down=tensor_bytes(result.grad[j]))
        for response in link.exchange(requests, timeout):
            _answered(response, traffic, failed, holds)
        served[index] += 1
        loss_sum, steps_done, images = loss_sum + result.loss, steps_done + 1, images + len(order) * shape[0]
    synced = _sync(method, link, round_index, [c for c in range(n) if served[c] > 0], traffic, failed, rejected,
                   holds, timeout)
    if synced:
        method.sync(torch.tensor(synced))
        for c in range(n):
            holds[c] = False  # the average is new to everyone: it goes down with each client's next forward
    return _record(method, round_index, traffic, served, failed, rejected, ledger, observer, loss_sum, steps_done,
                   images, time.perf_counter() - start)


def _answered(response: Response, traffic: SplitTraffic, failed: set[int], holds: dict[int, bool]) -> bool:
    """Count a response's wire bytes; a client that did not answer is failed and holds no nets any more."""
    traffic.add(response.client, wire_down=response.wire_down, wire_up=response.wire_up)
    if response.reply is None:
        failed.add(response.client)
        holds[response.client] = False
        return False
    return True


def _sync(method: MocoSFL, link: Link, round_index: int, participants: list[int], traffic: SplitTraffic,
          failed: set[int], rejected: set[int], holds: dict[int, bool], timeout: float) -> list[int]:
    """Collect the participants' nets into the server's view of them; the clients whose nets came and fit."""
    like_online = {k: v[0] for k, v in method.client_online.items()}
    requests = [Request(c, SYNC, {"round": round_index, "step": method.split.sync_every, "served": -1, "client": c})
                for c in participants]
    synced = []
    for response in link.exchange(requests, timeout):
        c = response.client
        if not _answered(response, traffic, failed, holds):
            continue
        parts = {part: from_record(response.reply.content[part]) for part in (ONLINE, MOMENTUM)
                 if part in response.reply.content}
        traffic.add(c, weights_up=sum(payload_bytes(p) for p in parts.values()))
        if not _fits(parts.get(ONLINE, {}), like_online) or (
                method.split.sync_momentum and not _fits(parts.get(MOMENTUM, {}), like_online)):
            rejected.add(c)
            continue
        index = torch.tensor([c])
        with torch.no_grad():
            scatter_(method.client_online, index, {k: v.unsqueeze(0) for k, v in parts[ONLINE].items()})
            if MOMENTUM in parts:
                scatter_(method.client_momentum, index, {k: v.unsqueeze(0) for k, v in parts[MOMENTUM].items()})
        synced.append(c)
    return sorted(synced)


def _record(method: MocoSFL, round_index: int, traffic: SplitTraffic, served: Tensor, failed: set[int],
            rejected: set[int], ledger: Ledger, observer: Observer, loss_sum: float, steps_done: int, images: int,
            seconds: float) -> dict[str, Any]:
    """Ledger rows per client (payload bytes by kind + wire bytes) and the round's metrics row."""
    batch = method.split.client_batch
    up = down = wire_up = wire_down = 0
    for c, t in sorted(traffic.rows.items()):
        steps = int(served[c])
        up_c, down_c = t["activations_up"] + t["weights_up"], t["gradients_down"] + t["weights_down"]
        ledger.record(round=round_index, client=c, kind=UPLOAD, bytes=up_c, activation_bytes=t["activations_up"],
                      weight_bytes=t["weights_up"], steps=steps, samples=steps * batch, wire_bytes=t["wire_up"])
        ledger.record(round=round_index, client=c, kind=DOWNLOAD, bytes=down_c, gradient_bytes=t["gradients_down"],
                      weight_bytes=t["weights_down"], steps=steps, wire_bytes=t["wire_down"])
        up, down = up + up_c, down + down_c
        wire_up, wire_down = wire_up + t["wire_up"], wire_down + t["wire_down"]
        observer.client_done(round_index, c, {"steps": steps, "bytes_up": up_c, "bytes_down": down_c,
                                              **({"failed": 1} if c in failed else {})})
    for c in sorted(failed | rejected):
        what = "failed (no usable reply in time)" if c in failed else "sent activations or nets that do not fit (rejected)"
        note(observer, f"round {round_index + 1}: client {c} {what}; the round went on without it")
    return {"round": round_index + 1, "loss": loss_sum / steps_done if steps_done else float("nan"),
            "clients": int((served > 0).sum()), "failed": len(failed), "rejected": len(rejected), "images": images,
            "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0, "bytes_up": up,
            "bytes_down": down, "steps": steps_done, "wire_up": wire_up, "wire_down": wire_down}
