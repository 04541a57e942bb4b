"""A client on its own node: its config, its data, its client role, what it keeps between messages.

Everything here runs in the ClientApp (a Ray actor in simulation, a ``flwr-clientapp``
process per message in a deployment) and reads nothing of the server's: the run's
config arrives in a message (once per node, then cached in ``context.state``), the
data is the node's own partition, and the client role (the client side of the method only) is built from
the config.

Node config (``flower-supernode --node-config``; set by Flower itself in simulation):

- ``partition-id``, ``num-partitions``: which client this node is, of how many;
- ``data-dir``: the node's OWN partition as written by ``fedssl deploy partition``
  (``images.npy`` + ``partition.json``); the node reads nothing else. Without it
  (simulation) the partition is cut from the whole dataset exactly as the
  in-process engine cuts it;
- ``device``: overrides the config's device on this node (e.g. ``cuda``);
- ``fault``: a test hook, ``nan`` or ``shape``: the node corrupts its uploads so
  that tests can check the server rejects them.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, replace

import torch
from flwr.app import ConfigRecord, Context, Message

from fedssl.config import RunConfig, config_hash, make_config
from fedssl.data.datasets import DatasetInfo, ImageData
from fedssl.engines.federation import Federation, load_federation, resolve_device
from fedssl.engines.flower.messages import TASK, from_record, to_record
from fedssl.engines.flower.partitions import digest, partition_key, read_partition  # noqa: F401 (digest: re-exported)
from fedssl.errors import FedSSLError
from fedssl.methods import METHODS
from fedssl.methods.base import FederatedClient, FederatedMethod, MethodContext, Payload

CONFIG_STATE = "fedssl.config"  # context.state: the run's config (toml + hash), cached after its first message
HELD_STATE = "fedssl.held"  # context.state: what a round-based client keeps (FederatedClient.kept)
FAULTS = ("", "nan", "shape")


@dataclass(frozen=True)
class NodeSetup:
    """What a node is told by its operator (``--node-config``)."""

    partition_id: int
    num_partitions: int
    data_dir: str = ""  # "" = simulation: cut the partition from the whole dataset
    device: str = ""  # "" = the config's device
    fault: str = ""  # test hook: "nan" | "shape" corrupt every upload


def node_setup(context: Context) -> NodeSetup:
    """The node's config, checked (a missing or malformed key is a clear error)."""
    conf = context.node_config
    missing = [k for k in ("partition-id", "num-partitions") if k not in conf]
    if missing:
        raise FedSSLError(f"this SuperNode has no {', '.join(missing)} in its node config; start it with "
                          "fedssl deploy supernode --partition-id I --num-partitions N --data-dir DIR")
    setup = NodeSetup(int(conf["partition-id"]), int(conf["num-partitions"]), str(conf.get("data-dir", "")),
                      str(conf.get("device", "")), str(conf.get("fault", "")))
    if not 0 <= setup.partition_id < setup.num_partitions:
        raise FedSSLError(f"node config partition-id={setup.partition_id} is outside 0..{setup.num_partitions - 1}")
    if setup.fault not in FAULTS:
        raise FedSSLError(f"node config fault={setup.fault!r}: use one of {', '.join(repr(f) for f in FAULTS)}")
    return setup


# ------------------------------------------------------------------ the run's config


def run_config(message: Message, context: Context) -> RunConfig:
    """The run's config: from the message when it carries one (then cached on the node), else the cached one.

    Every message carries the config's hash; a node that holds another config (or none) fails
    clearly rather than training something else.
    """
    task = message.content[TASK]
    want = str(task["config-hash"])
    if "config" in task:
        text = str(task["config"])
        cfg = _parse_config(text)
        if config_hash(cfg) != want:
            raise FedSSLError("the config the server sent reads differently here (another fedssl version on this "
                              "node?); install the server's fedssl version on every node")
        context.state[CONFIG_STATE] = ConfigRecord({"toml": text, "hash": want})
        return cfg
    cached = context.state.config_records.get(CONFIG_STATE)
    if cached is None or str(cached["hash"]) != want:
        raise FedSSLError("this node holds no config for this run (its state was lost); the server re-sends it")
    return _parse_config(str(cached["toml"]))


@functools.lru_cache(maxsize=4)
def _parse_config(text: str) -> RunConfig:
    return make_config(tomllib.loads(text))


def node_run_config(cfg: RunConfig, setup: NodeSetup) -> RunConfig:
    """The config as this node runs it: its own device if it names one; the thread count applied."""
    if setup.device:
        cfg = replace(cfg, device=setup.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg


# ------------------------------------------------------------------ the node's data


def client_data(cfg: RunConfig, setup: NodeSetup) -> ImageData:
    """The node's own images: its data dir (deployment), or its part of the dataset (simulation)."""
    if setup.num_partitions != _num_partitions(cfg):
        raise FedSSLError(f"this node is partition {setup.partition_id} of {setup.num_partitions} but the run has "
                          f"{_num_partitions(cfg)} clients; restart the SuperNodes with "
                          f"--num-partitions {_num_partitions(cfg)}")
    if setup.data_dir:
        return read_partition(setup.data_dir, setup.partition_id, setup.num_partitions, partition_key(cfg))
    return _simulated_partition(cfg, setup.partition_id)


def _num_partitions(cfg: RunConfig) -> int:
    return 1 if METHODS[cfg.method].pooled_data else cfg.clients


@functools.lru_cache(maxsize=1)
def _federation(cfg: RunConfig) -> Federation:
    return load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)


def _simulated_partition(cfg: RunConfig, partition_id: int) -> ImageData:
    return _federation(cfg).client_data(partition_id)


# ------------------------------------------------------------------ the node's client role


def client_role(cfg: RunConfig, info: DatasetInfo) -> FederatedClient:
    """The client role this node trains with, built from the config alone (cached per config): the client side
    of the method only, never its server state."""
    return _client_role(cfg, info)


@functools.lru_cache(maxsize=1)
def _client_role(cfg: RunConfig, info: DatasetInfo) -> FederatedClient:
    method = METHODS[cfg.method]
    if not issubclass(method, FederatedMethod):
        raise FedSSLError(f"{cfg.method} is not a round-based method; its clients take per-step messages")
    return method.build_client(MethodContext(cfg, info, resolve_device(cfg.device)))


# ------------------------------------------------------------------ what a client keeps between messages


def held(context: Context, key: str = HELD_STATE) -> Payload:
    """What this client kept from earlier messages ({} if nothing)."""
    record = context.state.array_records.get(key)
    return {} if record is None else from_record(record)


def keep(context: Context, payload: Payload | None, key: str = HELD_STATE) -> None:
    """Store what the client keeps (None: nothing) in the node's state: never sent anywhere."""
    if payload is None:
        if key in context.state:
            del context.state[key]
        return
    context.state[key] = to_record(payload)


def corrupt(upload: Payload, fault: str) -> Payload:
    """Test hook: NaN in the first floating tensor, or one row cut from it."""
    if not fault:
        return upload
    out = dict(upload)
    key = next(k for k, v in out.items() if torch.is_floating_point(v))
    out[key] = torch.full_like(out[key], float("nan")) if fault == "nan" else out[key].flatten()[:-1]
    return out
