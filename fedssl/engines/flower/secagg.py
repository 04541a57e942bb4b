"""Secure aggregation (``flower.secagg``): a round of a round-based method through Flower's own SecAgg+.

Nothing cryptographic is written here; both halves are Flower's (1.41):

- server: the four stages of ``flwr.server.workflow.SecAggPlusWorkflow`` (``setup_stage``,
  ``share_keys_stage``, ``collect_masked_vectors_stage``, ``unmask_stage``) are called one by one by
  :func:`secure_sum`, with this run's Grid, from our own round loop. Between the first two, each sampled
  client's ``train`` message (our task record + its download) takes the place of the legacy ``FitIns`` the
  workflow would send. The workflow hands the unmasked weighted mean to a two-method strategy stand-in
  (:class:`_Strategy`): the only model numbers the server ever receives.
- node: :func:`client_mod` wraps the ClientApp's ``train`` handler in ``flwr.client.mod.secaggplus_mod``
  whenever a message carries SecAgg+'s configs record. The handler trains as always; :func:`_as_fitres`
  turns its reply into the legacy ``FitRes`` layout the mod reads, holding the client's *change* this round
  (upload - download, float64, keys sorted) rather than its upload. The mod quantises it, masks it, and sends
  only the masked integers (it empties the reply's arrays).

What is summed is the change, so the clipping range bounds a round's change of a value (``flower.secagg_clip``),
not the weights themselves. The server adds the mean change to the tensors it sent, which every client of the
round received alike (:func:`_check_downloads`): that is FedAvg's weighted mean of the uploads, up to the
quantisation. Each surviving client's :class:`~fedssl.methods.base.ClientResult` then carries that aggregate in
place of an upload the server never had, so the method's own weighted mean of them returns it unchanged
(server momentum, layer versions and calibration work as before). The weights are the sample counts, which
Flower's protocol sends in the clear (``fitres.num_examples``), as does every node on ``query.hello``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedssl.config import RunConfig
from fedssl.config_schema import SECAGG_LEVELS, SECAGG_MODULUS
from fedssl.engines.flower import node
from fedssl.engines.flower.link import Link, short_reason
from fedssl.engines.flower.messages import PAYLOAD, RESULT, UPLOAD, from_record, to_record, wire_bytes
from fedssl.engines.rounds import Exchange, Reply
from fedssl.errors import FedSSLError
from fedssl.methods.base import ClientResult, FederatedMethod, Payload

Arrays = list[np.ndarray]  # one array per exchanged tensor, in sorted key order


# ------------------------------------------------------------------ server


@dataclass
class _Node:
    """What the workflow takes for a ClientProxy: it reads ``node_id`` alone."""

    node_id: int


class _Strategy:
    """The two strategy calls the workflow makes: who trains (our nodes) and the unmasked mean (kept here)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.results: dict[int, FitRes] = {}  # node -> FitRes: its sample count, metrics and the round's mean

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[_Node, FitIns]]:
        return [(_Node(n), FitIns(parameters, {})) for n in self.nodes]  # replaced by our messages after setup

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        self.results = {proxy.node_id: fitres for proxy, fitres in results}
        return None, {}  # nothing for the workflow to store: the mean is read from self.results


class _Nodes:
    """The client manager the workflow asks for a count (to log it)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def num_available(self) -> int:
        return self.count


class CountingGrid:
    """The Grid as the workflow uses it (``send_and_receive``), counting each node's message bytes both ways
    and keeping why a node's ClientApp failed."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.down: Counter[int] = Counter()
        self.up: Counter[int] = Counter()
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for message in messages:
            self.down[message.metadata.dst_node_id] += wire_bytes(message)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.up[reply.metadata.src_node_id] += wire_bytes(reply)
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = short_reason(reply.error.reason)
        return replies


def workflow_of(cfg: RunConfig, max_weight: int) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with this run's settings (``max_weight``: the largest sample count)."""
    fl = cfg.flower
    return SecAggPlusWorkflow(float(fl.secagg_shares), float(fl.secagg_threshold), max_weight=float(max_weight),
                              clipping_range=float(fl.secagg_clip), quantization_range=SECAGG_LEVELS,
                              modulus_range=SECAGG_MODULUS, timeout=fl.round_timeout)


def _context(round_index: int, strategy: _Strategy) -> LegacyContext:
    """The context the workflow's stages read: the round number, (empty) parameters, the strategy."""
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index + 1}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    base = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    return LegacyContext(base, strategy=strategy, client_manager=_Nodes(len(strategy.nodes)))  # type: ignore[arg-type]


def secure_sum(grid: Any, cfg: RunConfig, round_index: int, contents: dict[int, RecordDict],
               max_weight: int) -> tuple[dict[int, FitRes], Arrays | None]:
    """One SecAgg+ round over ``contents`` (node -> its train message's content).

    Returns the FitRes of each node whose masked vector was summed and the weighted mean of their changes
    (None: the protocol stopped, too few nodes left for the threshold).
    """
    workflow, strategy = workflow_of(cfg, max_weight), _Strategy(list(contents))
    context, state = _context(round_index, strategy), WorkflowState()
    if not workflow.setup_stage(grid, context, state):
        return {}, None
    state.nid_to_fitins = dict(contents)  # our train messages, in place of the legacy FitIns
    for stage in (workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage):
        if not stage(grid, context, state):
            return {}, None
    if not strategy.results:
        return {}, None
    any_result = next(iter(strategy.results.values()))
    return strategy.results, [np.asarray(a) for a in parameters_to_ndarrays(any_result.parameters)]


def _check_downloads(base: Payload, payload: Payload) -> None:
    """Every client must have been sent the server's tensors for its upload's keys (the change is added to them)."""
    if any(payload.get(k) is None or not torch.equal(payload[k], v) for k, v in base.items()):
        raise FedSSLError("secure aggregation adds the mean change to the tensors the server sent, but this "
                          "method sent a client other values for them; set flower.secagg=false for it")


def apply_mean(base: Payload, mean: Arrays) -> Payload:
    """The server's tensors plus the mean change (float64, rounded back to each tensor's dtype)."""
    keys = sorted(base)
    if len(mean) != len(keys) or any(m.size != base[k].numel() for k, m in zip(keys, mean)):
        raise ValueError(f"the secure sum has {len(mean)} arrays for {len(keys)} tensors of other sizes")
    out: Payload = {}
    for key, change in zip(keys, mean):
        tensor = base[key]
        delta = torch.from_numpy(np.asarray(change, dtype=np.float64).reshape(tuple(tensor.shape)))
        total = tensor.to(torch.float64) + delta
        out[key] = total.to(tensor.dtype) if torch.is_floating_point(tensor) else total.round().to(tensor.dtype)
    return out


def secure_exchange(link: Link, cfg: RunConfig, method: FederatedMethod) -> Exchange:
    """``federated_round``'s exchange under SecAgg+: the replies of the clients whose change was summed, each
    carrying the round's aggregate; the others failed."""
    def exchange(round_index: int, sends: Iterable[tuple[int, Payload]]) -> Iterator[Reply]:
        base, contents, clients = method.expected_upload(round_index), {}, {}
        for client, payload in sends:
            node_id = link.nodes.get(client)
            if node_id is None:
                yield Reply(client, None, "no SuperNode holds this client")
                continue
            _check_downloads(base, payload)
            task = {"round": round_index, "client": client}
            contents[node_id], clients[node_id] = link.content(node_id, task, {PAYLOAD: to_record(payload)}), client
        if contents:
            yield from _secure_replies(link, cfg, round_index, base, contents, clients)
    return exchange


def _secure_replies(link: Link, cfg: RunConfig, round_index: int, base: Payload, contents: dict[int, RecordDict],
                    clients: dict[int, int]) -> Iterator[Reply]:
    grid = CountingGrid(link.grid)
    max_weight = max(link.samples.get(c, 1) for c in clients.values())
    try:
        results, mean = secure_sum(grid, cfg, round_index, contents, max_weight)
        aggregate = None if mean is None else apply_mean(base, mean)
        halted = "" if mean is not None else "SecAgg+ stopped: too few clients left to unmask the sum"
    except (KeyError, TypeError, ValueError) as err:  # a reply the protocol cannot read: nothing is summed
        results, aggregate, halted = {}, None, f"SecAgg+ failed ({type(err).__name__}: {err})"
    for node_id, client in clients.items():
        fitres = results.get(node_id) if aggregate is not None else None
        link.answered(node_id, fitres is not None)
        if fitres is None:
            why = (f"its ClientApp failed: {grid.errors[node_id]}" if node_id in grid.errors else
                   halted or f"no masked vector within {cfg.flower.round_timeout:g} s")
            yield Reply(client, None, why, grid.down[node_id], grid.up[node_id])
            continue
        assert aggregate is not None
        result = ClientResult(client, aggregate, int(fitres.num_examples), dict(fitres.metrics))
        yield Reply(client, result, "", grid.down[node_id], grid.up[node_id])


# ------------------------------------------------------------------ node


def client_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ``train`` handler under SecAgg+ when the message is one of its stages; otherwise the handler as is."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)

    def train_as_fitres(msg: Message, ctx: Context) -> Message:
        return _as_fitres(msg, ctx, call_next(msg, ctx))

    return secaggplus_mod(message, context, train_as_fitres)


def client_change(download: Payload, upload: Payload) -> Arrays:
    """upload - download per tensor (float64, keys sorted); a change the server could not check is refused here."""
    if not upload or not set(upload) <= set(download):
        raise FedSSLError("this client's upload has tensors it was never sent; it cannot be securely summed")
    out: Arrays = []
    for key in sorted(upload):
        up, down = upload[key], download[key]
        if up.shape != down.shape:
            raise FedSSLError(f"this client's upload {key} has shape {tuple(up.shape)}, not {tuple(down.shape)}; "
                              "withheld from the secure sum (the server cannot reject it)")
        change = up.to(torch.float64) - down.to(torch.float64)
        if not bool(torch.isfinite(change).all()):
            raise FedSSLError(f"this client's upload {key} holds NaN or inf; withheld from the secure sum "
                              "(the server cannot reject it)")
        out.append(change.numpy())
    return out


def _as_fitres(message: Message, context: Context, reply: Message) -> Message:
    """The handler's reply in the legacy FitRes layout ``secaggplus_mod`` reads: the change, the sample count,
    the metrics (plus how many values the clipping range cut)."""
    if reply.has_error():
        return reply
    cfg = node.run_config(message, context)
    change = client_change(from_record(message.content[PAYLOAD]), from_record(reply.content[UPLOAD]))
    metrics = {k: v for k, v in reply.content[RESULT].items()}
    samples = int(metrics.pop("num-samples"))
    metrics["secagg_clipped"] = int(sum(int((np.abs(c) > cfg.flower.secagg_clip).sum()) for c in change))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(change), samples, metrics)  # type: ignore[arg-type]
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=message)

