"""LW-FedSSL and Prog-FedSSL: federated SSL trained stage by stage (see fedssl/stages.py).

Both are FedAvg of an SSL model (``FedAvgSSL``) whose encoder grows by one
stage every few rounds. LW-FedSSL trains and exchanges only the newest stage
(+ heads, the final norm and the stage's adapter); the earlier layers are frozen.
Prog-FedSSL trains and exchanges every layer built so far.

Server side, after each FedAvg: optional *calibration* (``calibration.aux_fraction``
> 0): SSL steps of the whole current model on the server's auxiliary unlabeled
set, held out of the clients' pool by the engine. Client side: optional
*alignment* (``alignment.weight`` > 0): the local loss adds the distance between
the local and the received global model's representation of the same images.

Communication is tracked exactly: a client's download holds the active part
plus every frozen layer whose current server version it has not received yet
(a late joiner gets all frozen layers; after a stage change everyone gets the
newly frozen layer once, in its final aggregated version; calibration of the
whole model makes frozen layers change, and they are sent again).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from fedssl.config import RunConfig, check
from fedssl.data.datasets import ImageData
from fedssl.losses import cosine_distance, mse_distance
from fedssl.methods.base import MethodContext, Payload, ReferenceCost, build_backbone, measure_ssl_step
from fedssl.methods.fedavg import FedAvgClient, FedAvgSSL
from fedssl.models.encoder import Encoder
from fedssl.models.momentum import copy_weights, deactivate_requires_grad
from fedssl.models.ssl import SSL_MODELS, SSLModel
from fedssl.models.staged import StagedEncoder, StagedModel, encoder_at
from fedssl.resources import StepCost, payload_bytes
from fedssl.stages import LayerVersions, Stage, StageSchedule, layer_prefixes, select_state
from fedssl.training import LocalStats, derive_seed, make_optimizer, train_local

DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cosine": cosine_distance, "mse": mse_distance}


class StagedSSL(StagedModel):
    """Mixin over an ``SSLModel`` whose ``encoder`` is a ``StagedEncoder`` (see ``StagedModel``).

    The loss runs the frozen layers ONCE per view (no grad) and hands their output
    to the objective's own loss, whose online and momentum encoders run only the
    active layers. With ``align_weight`` > 0 it adds the alignment term.
    """

    align_weight: float = 0.0
    align_distance: str = "cosine"

    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        h1, h2 = self.encoder.trunk(view1), self.encoder.trunk(view2)  # frozen part, shared by both branches
        reference = self.reference
        if not self.align_weight or reference is None:
            return super().loss(h1, h2)  # type: ignore[safe-super]
        self.encoder.record = []
        try:
            loss = super().loss(h1, h2)  # type: ignore[safe-super]
            z1, z2 = self.encoder.record[:2]  # the online representations of view 1 and view 2
        finally:
            self.encoder.record = None
        with torch.no_grad():
            r1, r2 = reference(h1), reference(h2)
        distance = DISTANCES[self.align_distance]
        return loss + self.align_weight * 0.5 * (distance(z1, r1) + distance(z2, r2))

    def alignment_term(self, view: Tensor) -> Tensor:
        """distance(local, reference) on one batch of views (0 when they hold the same weights)."""
        reference = self.reference
        assert reference is not None, "set_reference first"
        h = self.encoder.trunk(view)
        return DISTANCES[self.align_distance](self.encoder(h), reference(h))

    def held_modules(self) -> list[nn.Module]:
        """What a client holds at this stage (``StagedModel``), plus the alignment target's active part."""
        reference = self.reference
        return super().held_modules() + (reference.active_modules() if reference is not None and self.align_weight
                                         else [])


_STAGED_CLASSES: dict[str, type[SSLModel]] = {}


def build_staged_model(objective: str, backbone: Encoder, schedule: StageSchedule, cfg: RunConfig) -> SSLModel:
    """``Staged<Objective>``: the objective's SSL model over a ``StagedEncoder``, at the schedule's first stage."""
    if objective not in _STAGED_CLASSES:
        base = SSL_MODELS[objective]
        _STAGED_CLASSES[objective] = type(f"Staged{base.__name__}", (StagedSSL, base), {})
    model = _STAGED_CLASSES[objective](StagedEncoder(backbone, schedule.stage_ends), cfg.ssl)
    model.align_weight, model.align_distance = cfg.alignment.weight, cfg.alignment.distance
    model.set_stage(schedule.stage(0))  # type: ignore[attr-defined]
    return model


def load_subset(model: nn.Module, state: Payload) -> None:
    """Copy the given entries into ``model``'s state (any subset of its keys)."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))[:3]
    if unknown:
        raise ValueError(f"payload keys unknown to the model: {unknown}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def stage_lr(cfg: RunConfig, schedule: StageSchedule, round_index: int) -> float:
    """Cosine decay WITHIN each stage (a new block starts at the full rate), or constant."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * schedule.progress(round_index)))


def frozen_prefixes(layers: range | list[int]) -> tuple[str, ...]:
    """State-dict key prefixes of the staged model's encoder layers ``layers``."""
    return layer_prefixes("encoder.backbone.", layers)


class StagedClient(FedAvgClient):
    """A client of a stage-wise method: its worker at the round's stage, the frozen layers it keeps.

    A client keeps the frozen layers it was sent (``kept``) and is sent only those whose server version
    it lacks; the alignment target (``reference``) is its copy of the received global encoder.
    """

    def __init__(self, ctx: MethodContext, method: type[FedAvgSSL]) -> None:
        super().__init__(ctx, method)
        self.schedule = method.schedule_for(ctx.cfg, self.worker.encoder.backbone)  # type: ignore[attr-defined]
        self.stage = self.schedule.stage(0)
        self.reference = copy.deepcopy(self.worker.encoder) if ctx.cfg.alignment.weight else None
        if self.reference is not None:
            deactivate_requires_grad(self.reference)  # a fixed target: no graph through it

    def enter_round(self, round_index: int) -> Stage:
        """Put the worker at the stage of ``round_index``."""
        stage = self.schedule.at_round(round_index)
        if stage != self.stage:
            self.stage = stage
            self.worker.set_stage(stage)  # type: ignore[attr-defined]
        return stage

    def local_lr(self, round_index: int) -> float:
        return stage_lr(self.cfg, self.schedule, round_index)

    def receive(self, payload: Payload, round_index: int, client_id: int) -> None:
        """Frozen layers: the ones this client keeps, updated by the stale ones in the payload; then the rest."""
        stage = self.enter_round(round_index)
        worker = self.worker
        prefixes = frozen_prefixes(stage.frozen)
        frozen = {**select_state(self.kept.get(client_id, {}), prefixes), **select_state(payload, prefixes)}
        missing = sorted(set(select_state(worker.state_dict(), prefixes)) - set(frozen))
        if missing:
            raise ValueError(f"this client holds no copy of the frozen layers {missing[:3]} (its state was lost); "
                             "the server re-sends them once it has seen this failure")
        if frozen:
            self.kept[client_id] = frozen
        else:
            self.kept.pop(client_id, None)
        load_subset(worker, frozen)
        exchanged = set(worker.exchanged_state())
        load_subset(worker, {k: v for k, v in payload.items() if k not in exchanged})
        worker.load_exchanged_state({k: v for k, v in payload.items() if k in exchanged})
        worker.start_round()
        if self.reference is not None:
            copy_weights(self.reference, worker.encoder)
            self.reference.stage = stage
        worker.set_reference(self.reference)  # type: ignore[attr-defined]


class StagedFedSSL(FedAvgSSL):
    """FedAvg of a stage-wise SSL model; the schedule's mode is the method's (``stage_mode``)."""

    client_class = StagedClient
    calibrates = True
    stage_mode: ClassVar[str] = "layerwise"  # see fedssl.stages: which built layers train in a stage

    @classmethod
    def mode_of(cls, cfg: RunConfig) -> str:
        """The stage mode of a run of this method."""
        return cls.stage_mode

    @classmethod
    def schedule_for(cls, cfg: RunConfig, encoder: Encoder | None = None) -> StageSchedule:
        """The stage schedule of a run (without an encoder: from the configured backbone, not built)."""
        return StageSchedule.from_config(cfg, encoder, mode=cls.mode_of(cfg))

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        super().validate(cfg)
        check(not cfg.ssl.exchange_momentum, "ssl.exchange_momentum",
              f"{cls.name} re-copies the momentum branch each round and never sends it; set it to false")
        cls.schedule_for(cfg)  # raises ConfigError naming the fix for rounds / schedule

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.backbone = self.global_model.encoder.backbone  # type: ignore[union-attr]
        self.schedule = self.schedule_for(self.cfg, self.backbone)
        self.stage = self.schedule.stage(0)
        self.rounds_entered = 0  # the round whose stage is in force (for encoder() and resume)
        self.versions = LayerVersions(self.backbone.num_layers())  # who must download which frozen layer
        self.sent: dict[tuple[int, int], Payload] = {}  # (layer, version) -> its tensors as sent, shared by clients
        self.last_calibration: LocalStats | None = None

    @classmethod
    def objective_of(cls, cfg: RunConfig) -> str:
        return cfg.layerwise.objective

    @classmethod
    def aux_fraction(cls, cfg: RunConfig) -> float:
        return cfg.calibration.aux_fraction

    @classmethod
    def describe(cls, cfg: RunConfig) -> str:
        return describe_run(cfg, cls.schedule_for(cfg))

    # ------------------------------------------------------------ stages

    @classmethod
    def build_model(cls, ctx: MethodContext) -> SSLModel:
        backbone = build_backbone(ctx)
        schedule = cls.schedule_for(ctx.cfg, backbone)
        return build_staged_model(cls.objective_of(ctx.cfg), backbone, schedule, ctx.cfg).to(ctx.device)

    def enter_round(self, round_index: int) -> Stage:
        """Put the server's model at the stage of ``round_index``."""
        stage = self.schedule.at_round(round_index)
        self.rounds_entered = round_index
        if stage != self.stage:
            self.stage = stage
            self.global_model.set_stage(stage)  # type: ignore[attr-defined]
        return stage

    def local_lr(self, round_index: int) -> float:
        return stage_lr(self.cfg, self.schedule, round_index)

    # ------------------------------------------------------------ protocol

    def download(self, round_index: int, client_id: int) -> Payload:
        """The active part, plus the frozen layers whose current version this client lacks."""
        stage = self.enter_round(round_index)
        payload = self.global_model.exchanged_state()
        for layer in self.versions.sync(client_id, stage.frozen):
            payload.update(self._as_sent(layer))
        return payload

    def _as_sent(self, layer: int) -> Payload:
        """A frozen layer's current version, copied once (every client that downloads it shares the copy)."""
        version = self.versions.layer_version[layer]
        if (layer, version) not in self.sent:
            self.sent = {k: v for k, v in self.sent.items() if k[0] != layer}  # older versions: the clients' own
            state = select_state(self.global_model.state_dict(), frozen_prefixes([layer]))
            self.sent[(layer, version)] = {k: v.detach().clone() for k, v in state.items()}
        return self.sent[(layer, version)]

    def client_lost(self, client_id: int | None) -> None:
        """The client (None: every client) may have lost its frozen layers: the next download re-sends them all."""
        if client_id is None:
            self.versions.client_version.clear()
        else:
            self.versions.client_version.pop(client_id, None)

    def aggregate(self, round_index: int, results: list) -> None:
        stage = self.enter_round(round_index)
        if not any(r.metrics.get("steps", 0) > 0 for r in results):
            return
        super().aggregate(round_index, results)
        self.versions.touch(stage.active)
        if self.cfg.calibration.aux_fraction > 0 and self.ctx.server_data is not None:
            self.last_calibration = self.calibrate(round_index)

    def calibrate(self, round_index: int) -> LocalStats:
        """Server SSL steps on the auxiliary set only: the whole current model (scope model) or the active part."""
        cal, model, stage = self.cfg.calibration, self.global_model, self.stage
        trained = stage.end_to_end() if cal.scope == "model" else stage
        model.set_stage(trained)  # type: ignore[attr-defined]
        model.start_round()  # momentum branch re-copied from the aggregated model
        optimizer = make_optimizer(model.trainable_parameters(), self.cfg, cal.lr or self.local_lr(round_index))
        torch.manual_seed(derive_seed(self.cfg.seed, round_index, 0xCA1))
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, round_index, 0xCA2))
        steps_cfg = replace(self.cfg, local_steps=cal.steps, batch_size=cal.batch_size or self.cfg.batch_size)
        model.set_reference(None)  # type: ignore[attr-defined]
        stats = train_local(model, self.ctx.server_data, self.augment, optimizer, cfg=steps_cfg,
                            generator=generator, device=self.ctx.device)
        model.set_stage(stage)  # type: ignore[attr-defined]
        self.versions.retouch(trained.active)  # part of this round's server update
        return stats

    def encoder(self) -> Encoder:
        """The layers built so far (the whole backbone once the last stage has begun)."""
        return encoder_at(self.global_model.encoder.backbone, self.stage.depth)

    def initial_encoder(self) -> Encoder:
        """The final architecture (every stage's layers), not the first stage's truncated network."""
        return encoder_at(self.global_model.encoder.backbone, self.schedule.last().depth)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.rounds_entered, "versions": self.versions.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enter_round(int(state["round"]))
        super().load_state_dict(state)
        self.versions.load_state_dict(state["versions"])
        self.sent = {}

    # ------------------------------------------------------------ cost

    def measure_stage(self, data: ImageData, stage: Stage) -> StepCost:
        """One real client step at ``stage``, counting only what a client holds at that stage."""
        worker, current = self.client.worker, self.client.stage  # type: ignore[attr-defined]
        worker.set_stage(stage)  # type: ignore[attr-defined]
        try:
            return measure_ssl_step(worker, data, self.ctx, self.cfg.lr, self.client.augment,  # type: ignore[attr-defined]
                                    held=lambda m: m.held_modules())  # type: ignore[attr-defined]
        finally:
            worker.set_stage(current)  # type: ignore[attr-defined]

    def measure_client_step(self, data: ImageData) -> StepCost:
        """The costliest of the first stage (stem + block 1 trained) and the last (most frozen / whole model).

        Memory fields come from the stage with the larger peak; FLOPs per image are the larger of
        the two (the last stage also runs the frozen blocks), so neither figure is understated.
        """
        stages = sorted({0, self.schedule.num_stages - 1})
        costs = [self.measure_stage(data, self.schedule.stage(s)) for s in stages]
        worst = max(costs, key=lambda cost: cost.peak_training_bytes)
        return replace(worst, flops_per_image=max(cost.flops_per_image for cost in costs))

    def round_step_cost(self, round_index: int, data: ImageData) -> StepCost | None:
        """At the first round of each stage: that stage's client step (its active and frozen layers), measured."""
        index = self.schedule.stage_index(round_index)
        if round_index != self.schedule.first_round(index):
            return None
        return self.measure_stage(data, self.schedule.stage(index))

    def end_to_end_stage(self) -> Stage:
        """Every layer of the final model trained at once: what FedAvg of the whole model asks of a client."""
        last = self.schedule.last()
        return Stage(last.index, last.depth, 0)

    @classmethod
    def reference_name(cls, cfg: RunConfig) -> str:
        return "end-to-end: FedAvg of the whole model of the same final depth"

    def reference_cost(self, data: ImageData) -> ReferenceCost:
        """The client step and per-round payload of the end-to-end model (``end_to_end_stage``), measured."""
        stage, current, worker = self.end_to_end_stage(), self.client.stage, self.client.worker  # type: ignore[attr-defined]
        cost = self.measure_stage(data, stage)
        worker.set_stage(stage)
        try:
            payload = payload_bytes(worker.exchanged_state())
        finally:
            worker.set_stage(current)
        return ReferenceCost(cost, payload)


class LWFedSSL(StagedFedSSL):
    """LW-FedSSL: each stage trains and exchanges only its new layers; the earlier ones are frozen."""

    name = "lw-fedssl"
    stage_mode = "layerwise"


class ProgFedSSL(StagedFedSSL):
    """Prog-FedSSL: each stage trains and exchanges every layer built so far."""

    name = "prog-fedssl"
    stage_mode = "progressive"


def describe_run(cfg: RunConfig, schedule: StageSchedule) -> str:
    """One sentence for a run's report: the stages and whether calibration / alignment were used."""
    cal, al = cfg.calibration, cfg.alignment
    calibration = (f"on ({100 * cal.aux_fraction:g}% of the training split held out for the server, {cal.steps} "
                   f"steps per round, scope {cal.scope})") if cal.aux_fraction > 0 else "off"
    alignment = f"on (weight {al.weight:g}, {al.distance} distance)" if al.weight > 0 else "off"
    return (f"{schedule.num_stages} stages of {cfg.layerwise.blocks_per_stage} block(s), rounds per stage "
            f"{list(schedule.stage_rounds)}, objective {cfg.layerwise.objective}; server calibration {calibration}; "
            f"representation alignment {alignment}.")
