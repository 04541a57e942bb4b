"""End-to-end federated SSL (FedMoCo v2/v3, FedSimCLR, FedBYOL): FedAvg of the whole SSL model.

Clients are stateless between rounds (cross-device FL): each round a sampled
client receives the global online network (and the momentum branch if
``ssl.exchange_momentum``), trains locally with a fresh optimizer, and uploads
the same tensors back; the server averages them weighted by client data size.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from fedssl.aggregation import ServerMomentum, weighted_average
from fedssl.data.datasets import ImageData
from fedssl.methods.base import (ClientResult, FederatedMethod, MethodContext, Payload, build_augment,
                                 build_model, measure_ssl_step, seed_client)
from fedssl.models.encoder import Encoder
from fedssl.models.ssl import SSLModel
from fedssl.resources import StepCost
from fedssl.training import Augment, make_optimizer, round_lr, train_local


class FedAvgSSL(FederatedMethod):
    """FedAvg of an SSL model whose objective is fixed by the subclass."""

    objective: ClassVar[str]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        torch.manual_seed(ctx.cfg.seed)
        self.global_model = self.build_global_model()
        self.worker = copy.deepcopy(self.global_model)  # one client model, reused by every simulated client
        self.augment = self.build_augment()
        self.server_optimizer = ServerMomentum(self.cfg.server_momentum, self.cfg.server_lr)

    def build_global_model(self) -> SSLModel:
        """The server's SSL model (subclasses may wrap the backbone, e.g. stage by stage)."""
        return build_model(self.ctx, self.objective)

    def build_augment(self) -> Augment:
        """The views a local step feeds the model's loss (two SSL views here; one masked view for MAE)."""
        return build_augment(self.ctx)

    def receive(self, worker: SSLModel, payload: Payload, round_index: int,
                held: Payload | None = None) -> Payload | None:
        """Client side, before local training: load the download, reset local state (momentum re-copy).

        ``held``: what the client kept from earlier rounds (see ``FederatedMethod.client_update``).
        Returns what it keeps after this round (None: nothing; these clients are stateless).
        """
        worker.load_exchanged_state(payload)
        worker.start_round()
        return None

    def local_lr(self, round_index: int) -> float:
        return round_lr(self.cfg, round_index)

    def download(self, round_index: int, client_id: int) -> Payload:
        return self.global_model.exchanged_state()

    def client_update(self, payload: Payload, data: ImageData, *, round_index: int, client_id: int,
                      held: Payload | None = None) -> ClientResult:
        worker = self.worker
        kept = self.receive(worker, payload, round_index, held)
        generator = seed_client(self.cfg, round_index, client_id)
        optimizer = make_optimizer(worker.trainable_parameters(), self.cfg, self.local_lr(round_index))
        stats = train_local(worker, data, self.augment, optimizer, cfg=self.cfg, generator=generator,
                            device=self.ctx.device)
        upload = {k: v.clone() for k, v in worker.exchanged_state().items()}
        return ClientResult(client_id, upload, len(data), stats.as_dict(), held=kept)

    def aggregate(self, round_index: int, results: list[ClientResult]) -> None:
        trained = [r for r in results if r.metrics.get("steps", 0) > 0]
        if not trained:
            return
        averaged = weighted_average([r.upload for r in trained], [r.num_samples for r in trained])
        current = self.global_model.exchanged_state()
        self.global_model.load_exchanged_state(self.server_optimizer.step(current, averaged))

    def expected_upload(self, round_index: int) -> Payload:
        return self.global_model.exchanged_state()

    def encoder(self) -> Encoder:
        return self.global_model.encoder

    def state_dict(self) -> dict[str, Any]:
        return {"global_model": self.global_model.state_dict(), "server_momentum": self.server_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_model.load_state_dict(state["global_model"])
        self.server_optimizer.load_state_dict(state.get("server_momentum", {}))

    def measure_client_step(self, data: ImageData) -> StepCost:
        return measure_ssl_step(self.worker, data, self.ctx, self.cfg.lr, self.augment)


class FedMoCo(FedAvgSSL):
    name = "fedmoco"
    objective = "mocov2"


class FedMoCoV3(FedAvgSSL):
    name = "fedmocov3"
    objective = "mocov3"


class FedSimCLR(FedAvgSSL):
    name = "fedsimclr"
    objective = "simclr"


class FedBYOL(FedAvgSSL):
    name = "fedbyol"
    objective = "byol"
