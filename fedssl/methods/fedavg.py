"""End-to-end federated SSL (FedMoCo v2/v3, FedSimCLR, FedBYOL): FedAvg of the whole SSL model.

Clients are stateless between rounds (cross-device FL): each round a sampled
client receives the global online network (and the momentum branch if
``ssl.exchange_momentum``), trains locally with a fresh optimizer, and uploads
the same tensors back; the server averages them weighted by client data size.
With ``[privacy]`` (every method built on these classes: FedMoCo v2/v3, FedSimCLR, FedBYOL, LW-/Prog-FedSSL,
FedMAE) the client clips its update and the server takes the noised uniform average (``fedssl.privacy.dp``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedssl.aggregation import ServerMomentum, weighted_average
from fedssl.config import RunConfig, check
from fedssl.data.datasets import ImageData
from fedssl.methods.base import (ClientResult, FederatedClient, FederatedMethod, MethodContext, Payload, build_augment,
                                 build_model, measure_ssl_step, seed_client)
from fedssl.models.encoder import Encoder
from fedssl.models.ssl import SSLModel
from fedssl.privacy.dp import clients_per_round, clip_upload, new_noise_key, noise_generator, private_average
from fedssl.resources import StepCost
from fedssl.training import Augment, make_optimizer, round_lr, train_local


class FedAvgClient(FederatedClient):
    """A FedAvg client: its own copy of the SSL model (``worker``); it loads the download, trains, uploads.

    The in-process engine runs every simulated client through this one object, one after another; nothing
    of one client's training survives into the next one's (``receive`` resets it).
    """

    def __init__(self, ctx: MethodContext, method: type[FedAvgSSL]) -> None:
        super().__init__(ctx)
        torch.manual_seed(ctx.cfg.seed)  # the same initial weights as the server's global model
        self.worker = method.build_model(ctx)
        self.augment = method.build_augment(ctx)

    def receive(self, payload: Payload, round_index: int, client_id: int) -> None:
        """Before local training: load the download, reset local state (momentum re-copy)."""
        self.worker.load_exchanged_state(payload)
        self.worker.start_round()

    def local_lr(self, round_index: int) -> float:
        return round_lr(self.cfg, round_index)

    def train(self, payload: Payload, data: ImageData, *, round_index: int, client_id: int) -> ClientResult:
        worker = self.worker
        self.receive(payload, round_index, client_id)
        generator = seed_client(self.cfg, round_index, client_id)
        optimizer = make_optimizer(worker.trainable_parameters(), self.cfg, self.local_lr(round_index))
        stats = train_local(worker, data, self.augment, optimizer, cfg=self.cfg, generator=generator,
                            device=self.ctx.device)
        upload = {k: v.clone() for k, v in worker.exchanged_state().items()}
        metrics = stats.as_dict()
        if self.cfg.privacy.enabled:  # DP-FedAvg: what leaves the client is its update clipped to clip_norm
            upload, clipped = clip_upload(upload, payload, self.cfg.privacy.clip_norm)
            metrics["clipped"] = float(clipped)
        return ClientResult(client_id, upload, len(data), metrics)


class FedAvgSSL(FederatedMethod):
    """FedAvg of an SSL model whose objective is fixed by the subclass."""

    objective: ClassVar[str]
    client_class: ClassVar[type[FedAvgClient]] = FedAvgClient
    dp_refusal = ""  # takes [privacy]: fedssl.privacy.dp

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        super().validate(cfg)
        check(not (cfg.privacy.enabled and cfg.model.arch == "resnet" and cfg.model.norm == "batch"), "model.norm",
              "with [privacy], BatchNorm's running statistics would be clipped and noised with the weights (a noised "
              "variance can turn negative); set model.norm = \"group\"")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        torch.manual_seed(ctx.cfg.seed)
        self.global_model = self.build_model(ctx)
        self.client = self.build_client(ctx)  # the clients simulated in this process
        self.augment = self.build_augment(ctx)
        self.server_optimizer = ServerMomentum(self.cfg.server_momentum, self.cfg.server_lr)
        self.noise_key = new_noise_key(self.cfg) if self.cfg.privacy.enabled else 0  # DP noise: server secret

    @classmethod
    def objective_of(cls, cfg: RunConfig) -> str:
        """The SSL objective the method trains with."""
        return cls.objective

    @classmethod
    def build_model(cls, ctx: MethodContext) -> SSLModel:
        """The SSL model of one participant: the server's global model, or a client's own copy."""
        return build_model(ctx, cls.objective_of(ctx.cfg))

    @classmethod
    def build_augment(cls, ctx: MethodContext) -> Augment:
        """The views a local step feeds the model's loss (two SSL views here; one masked view for MAE)."""
        return build_augment(ctx)

    @classmethod
    def build_client(cls, ctx: MethodContext) -> FedAvgClient:
        return cls.client_class(ctx, cls)

    def download(self, round_index: int, client_id: int) -> Payload:
        return self.global_model.exchanged_state()

    def aggregate(self, round_index: int, results: list[ClientResult]) -> None:
        """FedAvg weighted by data size; with [privacy] the noised uniform average over the round's sampled
        clients (``fedssl.privacy.dp.private_average``). Server momentum steps from either."""
        trained = [r for r in results if r.metrics.get("steps", 0) > 0]
        if not trained:
            return
        current = self.global_model.exchanged_state()
        if self.cfg.privacy.enabled:
            averaged = private_average(current, [r.upload for r in trained], self.cfg,
                                       clients_per_round(self.cfg.sample_fraction, self.cfg.clients),
                                       noise_generator(self.noise_key, round_index))
        else:
            averaged = weighted_average([r.upload for r in trained], [r.num_samples for r in trained])
        self.global_model.load_exchanged_state(self.server_optimizer.step(current, averaged))

    def expected_upload(self, round_index: int) -> Payload:
        return self.global_model.exchanged_state()

    def encoder(self) -> Encoder:
        return self.global_model.encoder

    def state_dict(self) -> dict[str, Any]:
        return {"global_model": self.global_model.state_dict(), "clients": self.client.state_dict(),
                "server_momentum": self.server_optimizer.state_dict(), "noise_key": self.noise_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_model.load_state_dict(state["global_model"])
        self.client.load_state_dict(state.get("clients", {}))
        self.server_optimizer.load_state_dict(state.get("server_momentum", {}))
        self.noise_key = int(state.get("noise_key", self.noise_key))

    def measure_client_step(self, data: ImageData) -> StepCost:
        return measure_ssl_step(self.client.worker, data, self.ctx, self.cfg.lr, self.client.augment)


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
