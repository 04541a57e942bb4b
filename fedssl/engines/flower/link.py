"""Messages between the Flower server and the nodes, by client id.

:class:`Link` knows which node holds which client (each node says so on ``query.hello``),
sends messages through the Grid and pulls their replies until a timeout; a node that does
not answer in time, or whose ClientApp raised, is a *failed* client of that exchange, never
a stopped run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedssl.config import RunConfig, config_hash, dumps_toml, to_dict
from fedssl.engines.flower import timing
from fedssl.engines.flower.messages import HELLO, NODE, content, wire_bytes
from fedssl.engines.observer import Observer
from fedssl.errors import FedSSLError

log = logging.getLogger("fedssl")
POLL_SECONDS = 0.02  # between two pulls of the replies (the simulation runtime itself polls every 0.1 s)
TTL_MARGIN_SECONDS = 60.0  # a message lives this much longer than its exchange waits for it


@dataclass
class Request:
    """One message to send: to ``client``'s node, of ``message_type``, with task fields and records."""

    client: int
    message_type: str
    task: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    """What came of one request: the reply (None: nothing usable), why not, the bytes both ways."""

    client: int
    reply: Message | None
    failure: str = ""
    wire_down: int = 0
    wire_up: int = 0


class Link:
    """Messages between the server and the nodes, by client id."""

    def __init__(self, grid: Grid, cfg: RunConfig, observer: Observer) -> None:
        self.grid, self.cfg, self.observer = grid, cfg, observer
        self.config_text = dumps_toml(to_dict(cfg))
        self.config_hash = config_hash(cfg)
        self.nodes: dict[int, int] = {}  # client (partition id) -> node id
        self.asked: set[int] = set()  # node ids that answered hello (or failed it)
        self.configured: set[int] = set()  # node ids known to hold this run's config
        self.samples: dict[int, int] = {}  # client -> the images its node said it holds (on hello)

    # -------------------------------------------------------------- nodes

    def discover(self, expected: int, timeout: float) -> list[int]:
        """Ask every new node who it is, until all ``expected`` clients have a node or ``timeout`` passes.

        Returns the clients whose node changed (their state on the old node is gone).
        """
        deadline = time.monotonic() + timeout
        changed: list[int] = []
        errors: list[str] = []
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in self.asked]
            if new:
                changed += self._hello(new, errors)
            if len(self.nodes) >= expected or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not self.nodes:
            detail = f" ({'; '.join(errors[:3])})" if errors else ""
            raise FedSSLError(f"no SuperNode answered within {timeout:g} s{detail}; start one per client "
                              "(fedssl deploy supernode --partition-id I --num-partitions N --data-dir DIR) or raise "
                              "flower.connect_timeout")
        missing = sorted(set(range(expected)) - set(self.nodes))
        if missing:
            self._note(f"no SuperNode holds client(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                       "they count as failed whenever they are sampled")
        return changed

    def refresh(self) -> list[int]:
        """Greet nodes that joined since (a restarted SuperNode is a new node); the clients whose node changed."""
        new = [n for n in self.grid.get_node_ids() if n not in self.asked]
        return self._hello(new, []) if new else []

    def _hello(self, node_ids: list[int], errors: list[str]) -> list[int]:
        changed = []
        requests = [(node, self._message(node, HELLO, {}, {})) for node in node_ids]
        for node, response in self._send(requests, self.cfg.flower.connect_timeout):
            self.asked.add(node)
            if response.reply is None:
                errors.append(f"node {node}: {response.failure}")
                self._note(f"SuperNode {node} could not join: {response.failure}")
                continue
            info = dict(response.reply.content[NODE])
            client = int(info["partition-id"])
            if client in self.nodes and self.nodes[client] != node:
                changed.append(client)
            self.nodes[client] = node
            self.samples[client] = int(info["num-samples"])
            log.info("client %d is node %d: %d images from %s (digest %s)", client, node, int(info["num-samples"]),
                     info["data-source"], info["data-digest"])
        return changed

    # -------------------------------------------------------------- messages

    def exchange(self, requests: Iterable[Request], timeout: float) -> Iterator[Response]:
        """Send every request, then yield the responses as they come (failures after ``timeout`` s)."""
        sendable: list[tuple[int, Message]] = []
        clients: dict[int, int] = {}  # node -> client
        for request in requests:
            node = self.nodes.get(request.client)
            if node is None:
                yield Response(request.client, None, "no SuperNode holds this client")
                continue
            clients[node] = request.client
            sendable.append((node, self._message(node, request.message_type, request.task, request.records)))
        for node, response in self._send(sendable, timeout):
            response.client = clients[node]
            yield response

    def content(self, node: int, task: Mapping[str, Any], records: Mapping[str, Any]) -> RecordDict:
        """A message's content for ``node``: the task fields with the config's hash (and the config itself while
        the node may not hold it), then the records."""
        fields = {**task, "config-hash": self.config_hash}
        if node not in self.configured:
            fields["config"] = self.config_text  # the node's first message of this run: its config, then cached
        return content(task=fields, **records)

    def answered(self, node: int, ok: bool) -> None:
        """What a node's reply says of its config: it holds it (ok), or it may have lost it (its ClientApp failed)."""
        if ok:
            self.configured.add(node)
        else:
            self.configured.discard(node)

    def _message(self, node: int, message_type: str, task: Mapping[str, Any], records: Mapping[str, Any]) -> Message:
        ttl = max(self.cfg.flower.round_timeout, self.cfg.flower.connect_timeout) + TTL_MARGIN_SECONDS
        return Message(self.content(node, task, records), dst_node_id=node, message_type=message_type, ttl=ttl)

    def _send(self, messages: list[tuple[int, Message]], timeout: float) -> Iterator[tuple[int, Response]]:
        """Push the messages, pull replies until all came or ``timeout`` passed; (node, response) each."""
        if not messages:
            return
        sizes = {node: wire_bytes(message) for node, message in messages}
        began = time.time()
        ids = list(self.grid.push_messages([message for _, message in messages]))
        timing.record({"event": "push", "mids": ids, "began": began})
        pending = {mid: node for mid, (node, _) in zip(ids, messages) if mid}
        for (node, _), mid in zip(messages, ids):
            if not mid:
                yield node, Response(-1, None, "the SuperLink refused the message", sizes[node])
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages(list(pending)))
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                timing.record({"event": "reply", "mid": reply.metadata.reply_to_message_id})
                if reply.has_error():
                    self.configured.discard(node)
                    log.debug("node %d replied with an error: %s", node, reply.error.reason)
                    yield node, Response(-1, None, f"its ClientApp failed: {short_reason(reply.error.reason)}",
                                         sizes[node], wire_bytes(reply))
                    continue
                self.configured.add(node)
                yield node, Response(-1, reply, "", sizes[node], wire_bytes(reply))
            if pending and not replies:
                time.sleep(POLL_SECONDS)
        for node in pending.values():
            self.configured.discard(node)
            yield node, Response(-1, None, f"no reply within {timeout:g} s", sizes[node])

    def _note(self, text: str) -> None:
        log.info(text)
        self.observer.message(text)


def short_reason(reason: str) -> str:
    """The line that says what went wrong in a ClientApp's error (Ray wraps it in a traceback with colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "no reason given")[:300]
