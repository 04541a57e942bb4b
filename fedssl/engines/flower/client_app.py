"""The Flower ClientApp (``[tool.flwr.app.components] clientapp``): messages in, method calls, messages out.

Each handler only converts: records -> payloads, calls the node's client role
(``fedssl.engines.flower.node``, ``fedssl.engines.flower.split``), payloads -> records.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

import fedssl
from fedssl.engines.flower import node, secagg, split, timing
from fedssl.engines.flower.messages import (NODE, PAYLOAD, RESULT, TASK, UPLOAD, content, from_record, metrics_record,
                                           to_record)
from fedssl.errors import FedSSLError

app = ClientApp()
timing.imports_took(fedssl.IMPORT_STARTED, time.time())  # fedssl, torch, the methods: a fresh process's imports


def _setup(message: Message, context: Context):  # -> (RunConfig, NodeSetup)
    setup = node.node_setup(context)
    cfg = node.node_run_config(node.run_config(message, context), setup)
    timing.mark("config")
    return cfg, setup


@app.query("hello")
@timing.traced
def hello(message: Message, context: Context) -> Message:
    """Who this node is: its partition, how many images it holds and where it read them."""
    cfg, setup = _setup(message, context)
    data = node.client_data(cfg, setup)
    answer = ConfigRecord({"partition-id": setup.partition_id, "num-partitions": setup.num_partitions,
                           "num-samples": len(data), "data-digest": node.digest(data.images),
                           "data-source": setup.data_dir or "simulation"})
    return Message(content(**{NODE: answer}), reply_to=message)


@app.train(mods=[secagg.client_mod])  # under flower.secagg: Flower's SecAgg+ mod around the handler
@timing.traced
def train(message: Message, context: Context) -> Message:
    """A round of a round-based method: the download in, local training, the upload out."""
    cfg, setup = _setup(message, context)
    task = message.content[TASK]
    client, round_index = int(task["client"]), int(task["round"])
    if client != setup.partition_id:
        raise FedSSLError(f"a message for client {client} reached the node of client {setup.partition_id}")
    data = node.client_data(cfg, setup)
    role = node.client_role(cfg, data.info)
    held = node.held(context)
    role.kept = {client: held} if held else {}  # what this client kept from its earlier rounds
    timing.mark("build")
    download = from_record(message.content[PAYLOAD])
    timing.mark("deserialise")
    result = role.train(download, data, round_index=round_index, client_id=client)
    timing.mark("compute")
    node.keep(context, role.kept.get(client))
    upload = node.corrupt(result.upload, setup.fault)
    reply = Message(content(**{UPLOAD: to_record(upload),
                               RESULT: metrics_record({"num-samples": result.num_samples, **result.metrics})}),
                    reply_to=message)
    timing.mark("serialise")
    return reply


@app.train("forward")
@timing.traced
def forward(message: Message, context: Context) -> Message:
    """Split step, part 1: this client's activations at the cut."""
    cfg, setup = _setup(message, context)
    return Message(split.client_forward(cfg, setup, message.content, context), reply_to=message)


@app.train("backward")
@timing.traced
def backward(message: Message, context: Context) -> Message:
    """Split step, part 2: the server's gradient in; back-propagation and the client-net's update."""
    cfg, setup = _setup(message, context)
    return Message(split.client_backward(cfg, setup, message.content, context), reply_to=message)


@app.train("sync")
@timing.traced
def sync(message: Message, context: Context) -> Message:
    """Split round end: this client's nets go up to be averaged."""
    cfg, setup = _setup(message, context)
    return Message(split.client_sync(cfg, setup, message.content, context), reply_to=message)


@app.train("average")
@timing.traced
def average(message: Message, context: Context) -> Message:
    """Split round end: the average of the synced client-nets comes down."""
    cfg, setup = _setup(message, context)
    return Message(split.client_average(cfg, setup, message.content, context), reply_to=message)
