"""Centralized SSL on the pooled data: the ceiling every federated method is compared with.

One participant holds every training image; a "round" is ``local_epochs``
epochs over the pooled data. Nothing crosses a wire. The optimizer state, the
momentum branch and the MoCo queue persist across rounds, as in ordinary
single-machine training.
"""

from __future__ import annotations

from typing import Any

import torch

from fedssl.data.datasets import ImageData
from fedssl.methods.base import (ClientResult, FederatedClient, FederatedMethod, MethodContext, Payload, build_augment,
                                 build_model, measure_ssl_step, seed_client)
from fedssl.models.encoder import Encoder
from fedssl.resources import StepCost
from fedssl.training import make_optimizer, round_lr, train_local


class CentralizedTrainer(FederatedClient):
    """The one participant: the model, its optimizer and the MoCo queue persist across its rounds."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        torch.manual_seed(ctx.cfg.seed)
        self.model = build_model(ctx, ctx.cfg.ssl.objective)
        self.model.start_round()
        self.augment = build_augment(ctx)
        self.optimizer = make_optimizer(self.model.trainable_parameters(), self.cfg, self.cfg.lr)

    def train(self, payload: Payload, data: ImageData, *, round_index: int, client_id: int) -> ClientResult:
        for group in self.optimizer.param_groups:
            group["lr"] = round_lr(self.cfg, round_index)
        generator = seed_client(self.cfg, round_index, client_id)
        stats = train_local(self.model, data, self.augment, self.optimizer, cfg=self.cfg, generator=generator,
                            device=self.ctx.device)
        return ClientResult(client_id, {}, len(data), stats.as_dict())


class Centralized(FederatedMethod):
    """The server is the single machine that trains: nothing is downloaded, uploaded or aggregated."""

    name = "centralized"
    pooled_data = True
    dp_refusal = "trains one participant's pooled data: there is no client whose update DP-FedAvg could protect"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.client: CentralizedTrainer = self.build_client(ctx)

    @classmethod
    def build_client(cls, ctx: MethodContext) -> CentralizedTrainer:
        return CentralizedTrainer(ctx)

    def download(self, round_index: int, client_id: int) -> Payload:
        return {}

    def aggregate(self, round_index: int, results: list[ClientResult]) -> None:
        return None

    def expected_upload(self, round_index: int) -> Payload:
        return {}

    def encoder(self) -> Encoder:
        return self.client.model.encoder

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.client.model.state_dict(), "optimizer": self.client.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client.model.load_state_dict(state["model"])
        self.client.optimizer.load_state_dict(state["optimizer"])

    def measure_client_step(self, data: ImageData) -> StepCost:
        return measure_ssl_step(self.client.model, data, self.ctx, self.cfg.lr, self.client.augment)
