"""MocoSFL: split federated learning + MoCo (Li et al., ICLR 2023), simulated with stacked client nets.

The ResNet is cut after ``split.cut`` layers (1 = the stem only). Every client holds an online
client-net and its momentum copy (``fedssl.methods.mocosfl_client``); the server holds the rest of
the network, the MoCo v2 projector, their momentum copy and ONE shared queue of negative keys
(``fedssl.methods.mocosfl_server``). The step and the sync follow the split protocol of
``fedssl.methods.split``, driven by ``fedssl.engines.steps.split_round`` for both engines: a step's
client forward, the server step on the concatenated activations, the client backward; every
``sync_every`` steps (= one round) the client-nets of the round's clients are averaged (online, and
momentum if ``split.sync_momentum``; the reference code averages the online nets only) and sent back
to them.

Designed here (not fixed by the paper): the LR of clients and server follows the run's per-round
schedule; per-client SGD state persists across rounds and is never averaged; a client that sat out
a sync receives the latest client-net with its next forward (counted in the ledger); every client
starts from the seeded initial client-net (nothing to download before the first sync).

``split.auto_adjust`` reproduces the reference scripts' choice for N clients:
``client_batch = 100 // N`` for N <= 50 else 1; ``clients_per_step = 100 / N``
for N >= 200 (about 100 images per server step) else 1. It picks only what depends
on N: ``sync_every`` stays the config's (its default, 50, is the reference's), so
``--set split.sync_every=...`` shortens a round of a preset that auto-adjusts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedssl.config import RunConfig, check
from fedssl.data.datasets import ImageData
from fedssl.methods.base import MethodContext, Payload, build_backbone
from fedssl.methods.mocosfl_client import MocoSFLClients, check_cut, effective_split  # noqa: F401 (re-exported)
from fedssl.methods.mocosfl_server import MocoSFLServer, banked_info_nce  # noqa: F401 (re-exported)
from fedssl.methods.split import ServerStep, SplitMethod, Stacked
from fedssl.models.encoder import Encoder
from fedssl.resources import StepCost, measure_step


class MocoSFL(SplitMethod):
    name = "mocosfl"

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """A ResNet with GroupNorm, cut so that the server holds a layer; the stacked client optimizer is SGD."""
        super().validate(cfg)
        check(cfg.model.arch == "resnet", "model.arch", "mocosfl splits a ResNet; set model.arch = \"resnet\"")
        check(cfg.model.norm == "group", "model.norm", "mocosfl trains client-nets on per-client batches of a few "
              "images, where BatchNorm statistics are wrong; set model.norm = \"group\"")
        layers = 1 + sum(cfg.model.blocks_per_stage)
        check(cfg.split.cut < layers, "split.cut", f"{cfg.split.cut} leaves the server no layer of the {layers} "
              f"(stem + blocks); choose 1 <= split.cut <= {layers - 1}")
        check(cfg.optimizer == "sgd", "optimizer", "mocosfl's stacked client optimizer is SGD; set optimizer = \"sgd\"")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.num_clients = cfg.clients
        self.split = effective_split(cfg.split, cfg.clients)
        self.cut = cfg.split.cut
        torch.manual_seed(cfg.seed)
        global_encoder = build_backbone(ctx).to(ctx.device)  # layers[:cut]: averaged client-net; the rest: server
        check_cut(global_encoder, self.cut)
        self.server = MocoSFLServer(global_encoder, self.cut, cfg, cfg.clients, self.split.queue == "per_client")
        self.clients = self.build_clients(ctx, range(cfg.clients))  # the clients simulated in this process
        self.holds_latest = torch.ones(cfg.clients, dtype=torch.bool)  # every client starts with the seeded net
        self.version = 0
        self._activations: Payload | None = None

    @classmethod
    def build_clients(cls, ctx: MethodContext, ids: Sequence[int]) -> MocoSFLClients:
        return MocoSFLClients(ctx, ids)

    # -------------------------------------------------------------- the server role

    def latest(self) -> Payload:
        return self.server.latest(momentum=self.split.sync_momentum)

    def activations_like(self) -> Payload:
        """(B, C', H', W') query and key activations of one client at the cut (a probe through the client-net)."""
        if self._activations is None:
            size, channels = self.ctx.image_size, self.ctx.info.channels
            net = self.server.client_nets(momentum=False)["online"]
            with torch.no_grad():
                dtype = next(net.parameters()).dtype
                probe = net(torch.zeros(self.split.client_batch, channels, size, size, device=self.ctx.device,
                                        dtype=dtype))
            self._activations = {"query": torch.empty(probe.shape), "key": torch.empty(probe.shape)}
        return self._activations

    def gradient_like(self) -> Payload:
        """The server sends the gradient of the query activations only (the keys take none)."""
        return {"query": self.activations_like()["query"]}

    def server_step(self, activations: Stacked, clients: Tensor, lr: float) -> ServerStep:
        device = self.ctx.device
        result = self.server.step(activations["query"].to(device), activations["key"].to(device), clients, lr)
        return ServerStep(result.loss, {"query": result.grad})

    def average(self, nets: Stacked) -> Payload:
        self.server.average(nets)
        self.version += 1
        return self.latest()

    def measure_server_step(self, activations: Stacked, clients: Tensor) -> StepCost:
        """One real server step on a copy of the server, on the activations (n, B, ...) of ``clients``."""
        probe = copy.deepcopy(self.server)
        query, key = activations["query"].to(self.ctx.device), activations["key"].to(self.ctx.device)
        modules = [probe.encoder, probe.projector, probe.momentum_encoder, probe.momentum_projector, probe.queue]
        with torch.random.fork_rng(devices=[]):
            return measure_step(lambda: probe.step(query, key, clients, self.cfg.lr), modules=modules,
                                optimizer=probe.optimizer, images=int(query.shape[0] * query.shape[1]),
                                device=self.ctx.device)

    def measure_client_step(self, data: ImageData) -> StepCost:
        """One real step of ONE client: augment, online + momentum forward, backward of a gradient shaped like the
        server's, SGD step, EMA."""
        return self.clients.measure_step(data)

    # -------------------------------------------------------------- engine protocol

    def encoder(self) -> Encoder:
        """The global encoder: the averaged online client-net (layers[:cut]) + the server's layers."""
        return self.server.encoder

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict(), **self.clients.state_dict(), "holds_latest": self.holds_latest,
                "version": torch.tensor(self.version)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        self.clients.load_state_dict(state)
        self.holds_latest.copy_(state["holds_latest"])
        self.version = int(state.get("version", 0))  # older checkpoints: 0 (a resumed Flower run re-sends the nets)
