"""The method protocol: what runs on a client, what on the server, what crosses the wire.

A round-based method is written once against ``FederatedMethod`` (the server role) and its
``FederatedClient`` (the client role) and run by either engine. Per round the engine asks the
server for each sampled client's ``download`` payload, hands it to the client role's ``train``
(which returns the ``upload`` payload), and gives the uploads to ``aggregate``. The payloads are
the real tensors that travel, so the ledger counts bytes from them directly. Split methods
(step-based) follow ``fedssl.methods.split``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from fedssl.config import RunConfig, check
from fedssl.data.augment import TwoViewAugment
from fedssl.data.datasets import DatasetInfo, ImageData
from fedssl.models.backbones import build_encoder
from fedssl.models.encoder import Encoder
from fedssl.models.ssl import SSLModel, build_ssl_model
from fedssl.resources import StepCost, measure_step
from fedssl.training import Augment, derive_seed, make_optimizer, ssl_step

Payload = dict[str, Tensor]


@dataclass(frozen=True)
class MethodContext:
    """What every method is built from."""

    cfg: RunConfig
    info: DatasetInfo
    device: torch.device
    server_data: ImageData | None = None  # the server's own unlabeled set (see ``Method.aux_fraction``)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size or self.info.image_size


@dataclass
class ClientResult:
    """A client's reply: the upload payload, its data size (FedAvg weight) and local metrics."""

    client_id: int
    upload: Payload
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class FederatedClient(ABC):
    """The client role of a round-based method, for the clients ONE machine holds (a Flower node: its own; the
    in-process engine: all of them, one after another).

    ``kept[c]``: what client c keeps between its rounds and never sends (e.g. the frozen layers of a layer-wise
    method, downloaded once; {} or absent: nothing). A node restores its client's from ``context.state``
    before ``train`` and stores it after; in-process it stays here (and in the checkpoint). A payload's
    tensors are never written to once sent, so a client may keep them as they are.
    """

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self.kept: dict[int, Payload] = {}

    @abstractmethod
    def train(self, payload: Payload, data: ImageData, *, round_index: int, client_id: int) -> ClientResult:
        """Local training from the download on the client's own data; its reply (the upload)."""

    def state_dict(self) -> dict[str, Any]:
        return {"kept": {int(c): dict(p) for c, p in self.kept.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = {int(c): dict(p) for c, p in state.get("kept", {}).items()}


@dataclass(frozen=True)
class ReferenceCost:
    """What the same client would pay under the method's reference (e.g. end-to-end FedAvg of the same model)."""

    cost: StepCost  # one real client step of the reference, measured
    payload_bytes: int  # its payload each way per round of participation


class Method(ABC):
    """What every method offers the engines: the global encoder, resumable state, a measured client step;
    and its own rules: what it accepts of a config, its default backbone, what it reads."""

    name: ClassVar[str]
    pooled_data: ClassVar[bool] = False  # True: one participant holds all data (the centralized ceiling)
    calibrates: ClassVar[bool] = False  # reads [calibration] and [alignment] (server calibration, alignment)
    default_model: ClassVar[Mapping[str, Any]] = {}  # [model] settings when a config sets no model.arch
    # why [privacy] (client-level DP-FedAvg, fedssl.privacy.dp) does not apply to the method ("" = it does)
    dp_refusal: ClassVar[str] = "exchanges no per-round client update that clipping could bound"

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """The method's own rules on a config whose values are each in range (ConfigError naming key and fix)."""
        if not cls.pooled_data:
            check(2 <= cfg.clients <= 10_000, "clients", f"{cfg.clients} is out of range; use 2 to 10000 clients")
        if cfg.privacy.enabled and cls.dp_refusal:
            takers = ", ".join(private_methods())
            check(False, "privacy.enabled", f"{cls.name} {cls.dp_refusal}; client-level DP is for the round-based "
                  f"methods ({takers}); set it to false")

    @classmethod
    def aux_fraction(cls, cfg: RunConfig) -> float:
        """Share of the training split the server keeps for itself (removed from the clients' pool)."""
        return 0.0

    @classmethod
    def describe(cls, cfg: RunConfig) -> str:
        """A sentence for the run's report on the method's own settings ("" = nothing to add)."""
        return ""

    @classmethod
    def reference_name(cls, cfg: RunConfig) -> str:
        """What ``reference_cost`` measures, for the report ("" = no reference)."""
        return ""

    def reference_cost(self, data: ImageData) -> ReferenceCost | None:
        """The client cost of the method's reference on ``data`` (see ``ReferenceCost``), or None."""
        return None

    figures_title: ClassVar[str] = "Figures"  # the report's heading over ``write_round_figures``' PNGs

    def write_round_figures(self, round_index: int, folder: Path, test: ImageData) -> list[Path]:
        """After a round's aggregation: PNGs of the model for the report (FedMAE: reconstructions); [] = none."""
        return []

    @abstractmethod
    def encoder(self) -> Encoder:
        """The current global encoder (what is evaluated and exported)."""

    def initial_encoder(self) -> Encoder:
        """Before the first round: the random-init encoder of the FINAL architecture (the baseline every
        result stands beside). A method whose ``encoder()`` grows over the run (stage-wise) returns the
        full-depth network here."""
        return self.encoder()

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything the server must keep to resume (checkpoint content)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def measure_client_step(self, data: ImageData) -> StepCost:
        """Run one real client training step under measurement (memory, FLOPs), without side effects."""

    def round_step_cost(self, round_index: int, data: ImageData) -> StepCost | None:
        """The client step of ``round_index`` measured, where it differs from the run's (:meth:`measure_client_step`)
        from this round on; None = it does not. The simulated clock reads it (a staged method's stages)."""
        return None

    def client_lost(self, client_id: int | None) -> None:
        """Server side: the client's state may be gone (it failed, or None: every client, a new Flower run).

        Whatever the server believed it held must be sent again when it next takes part.
        """


def private_methods(root: type[Method] | None = None) -> list[str]:
    """The names of the methods that take [privacy] (``dp_refusal`` empty), from the method classes defined."""
    names: list[str] = []
    for sub in (root or Method).__subclasses__():
        if not sub.dp_refusal and "name" in vars(sub):
            names.append(sub.name)
        names += [n for n in private_methods(sub) if n not in names]
    return names


class FederatedMethod(Method):
    """A round-based method's server role: per round, download -> (the clients train) -> aggregate.

    ``client``: the client role of the clients simulated in this process (the in-process engine trains
    them; on a Flower server it only measures a client's step: each node builds its own with
    :meth:`build_client`).
    """

    client: FederatedClient

    @classmethod
    @abstractmethod
    def build_client(cls, ctx: MethodContext) -> FederatedClient:
        """The client role, built from the config alone (no server state)."""

    @abstractmethod
    def download(self, round_index: int, client_id: int) -> Payload:
        """Server -> client payload for this round."""

    @abstractmethod
    def aggregate(self, round_index: int, results: list[ClientResult]) -> None:
        """Server side: fold the clients' uploads into the global state."""

    @abstractmethod
    def expected_upload(self, round_index: int) -> Payload:
        """Server side, after this round's downloads: the tensors a valid upload holds (keys, shapes, dtypes).

        An upload that differs, or holds NaN/inf, is rejected and never aggregated
        (``fedssl.aggregation.check_upload``).
        """



# ------------------------------------------------------------ shared building blocks


def build_model(ctx: MethodContext, objective: str) -> SSLModel:
    """The SSL model of the config's backbone, on the context's device."""
    return build_ssl_model(objective, build_backbone(ctx), ctx.cfg.ssl).to(ctx.device)


def build_backbone(ctx: MethodContext) -> Encoder:
    """The config's encoder, with only the settings its architecture takes."""
    m = ctx.cfg.model
    if m.arch == "vit":
        arch_kwargs = dict(width=m.width, patch_size=m.patch_size, depth=m.depth, heads=m.heads)
    else:
        arch_kwargs = dict(width=m.width, blocks_per_stage=m.blocks_per_stage, norm=m.norm, stem=m.stem,
                           group_channels=m.group_channels)
    return build_encoder(m.arch, in_channels=ctx.info.channels, image_size=ctx.image_size, **arch_kwargs)


def build_augment(ctx: MethodContext) -> TwoViewAugment:
    info = ctx.info
    return TwoViewAugment(ctx.image_size, info.mean, info.std, preset=ctx.cfg.ssl.augment,
                          channels=info.channels, blur=ctx.cfg.ssl.blur).to(ctx.device)


def seed_client(cfg: RunConfig, round_index: int, client_id: int) -> torch.Generator:
    """Seed the global RNG (augmentations) and return a generator (shuffling) for one client-round."""
    torch.manual_seed(derive_seed(cfg.seed, round_index, client_id, 1))
    return torch.Generator().manual_seed(derive_seed(cfg.seed, round_index, client_id, 0))


def measure_ssl_step(model: SSLModel, data: ImageData, ctx: MethodContext, lr: float, augment: Augment,
                     held: Callable[[SSLModel], list[nn.Module]] | None = None) -> StepCost:
    """One real SSL step of a *copy* of model on the first batch of data, measured; RNG state untouched.

    ``augment`` makes the views the model's loss takes; ``held(copy)`` names the modules a client
    really holds (default: the whole model).
    """
    probe = copy.deepcopy(model)
    probe.train()
    optimizer = make_optimizer(probe.trainable_parameters(), ctx.cfg, lr)
    images = data.images[: min(ctx.cfg.batch_size, len(data))].to(ctx.device)
    modules = held(probe) if held is not None else [probe]
    with torch.random.fork_rng(devices=[]):
        return measure_step(lambda: ssl_step(probe, optimizer, images, augment), modules=modules,
                            optimizer=optimizer, images=int(images.shape[0]), device=ctx.device)
