"""Stage-wise training of an encoder: ONE mechanism for LW-FedSSL, Prog-FedSSL and FedMAE's cascade.

An encoder is an ordered list of layers ``[stem, block1, ..., blockD]`` (see
``fedssl.models.encoder``). A *unit* is what one stage step adds: a transformer
block (ViT) or a whole ResNet stage (``ResNet.stage_ends``). A schedule groups
``blocks_per_stage`` units into a stage and gives each stage some rounds.

At stage ``s`` (0-based) the model uses ``layers[:depth]``; of these

- ``layers[first_active:depth]`` are *active*: trained, and exchanged each round;
- ``layers[:first_active]`` are *frozen*: forward only under ``torch.no_grad()``
  (no activations kept, no grads, no optimizer state, eval mode);
- ``layers[depth:]`` are *unbuilt*: not used, not held by a client, not sent.

``mode="layerwise"`` (LW-FedSSL, FedMAE's stage-wise cascade): ``first_active`` =
where the stage's new units begin. ``mode="progressive"`` (Prog-FedSSL):
``first_active = 0``. ``mode="independent"`` (FedMAE's independent cascade): like
``layerwise``, but the earlier blocks are *bypassed* (built, not run, not held):
each new block trains on the stem's output alone, and the blocks are stacked
only for the final encoder.

Decisions (documented here, tested in tests/methods/test_layerwise.py):

- the stem / patch embedding (``layers[0]``) trains with the first stage and is
  frozen afterwards, like block 1;
- the ViT's final LayerNorm (``encoder.norm``, used by ``pool``) belongs to the
  head side: it is active (trained and exchanged) in EVERY stage, so the pooled
  features of whichever block is last are normalised by a trained norm;
- ResNet stages have different widths: each schedule stage owns a linear adapter
  from its output width to the head input width (the encoder's final width;
  ``nn.Identity`` where they already agree, e.g. every ViT stage and the last
  ResNet stage). The adapter is active with its stage only (it travels with it)
  and is dropped from use afterwards.

Here: the schedule (:class:`Stage`, :class:`StageSchedule`) and who holds which layer version
(:class:`LayerVersions`); the encoder and SSL model that train stage by stage are
``fedssl.models.staged``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedssl.config import RunConfig
from fedssl.errors import ConfigError
from fedssl.models.encoder import Encoder

MODES = ("layerwise", "progressive", "independent")


# ---------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Stage:
    """One stage: ``layers[:first_active]`` frozen (but the bypassed ones), ``layers[first_active:depth]`` active."""

    index: int  # 0-based stage number
    depth: int  # number of encoder layers built
    first_active: int  # first trained / exchanged layer
    bypassed: tuple[int, ...] = ()  # built earlier layers that this stage neither runs nor holds

    @property
    def active(self) -> range:
        return range(self.first_active, self.depth)

    @property
    def frozen(self) -> list[int]:
        """The layers run (in this order) without grad before the active ones."""
        return [i for i in range(self.first_active) if i not in self.bypassed]

    @property
    def held(self) -> list[int]:
        """The layers a client holds at this stage: frozen + active."""
        return [*self.frozen, *self.active]

    def end_to_end(self) -> Stage:
        """The same depth with every used layer active (server calibration, Prog-FedSSL)."""
        return Stage(self.index, self.depth, 0)


def unit_ends(encoder: Encoder) -> list[int]:
    """Layer index after each unit: ResNet stage ends, or one per ViT block (the stem rides with the first)."""
    ends = getattr(encoder, "stage_ends", None)
    if ends is not None:
        return [int(k) for k in ends]
    return list(range(2, encoder.num_layers() + 1))


def stage_rounds(cfg: RunConfig, num_stages: int) -> tuple[int, ...]:
    """Rounds of each stage from ``layerwise.schedule`` / ``rounds_per_stage`` / an even split of ``rounds``."""
    lw = cfg.layerwise
    if lw.schedule:
        if len(lw.schedule) != num_stages or min(lw.schedule) < 1:
            raise ConfigError(f"config key 'layerwise.schedule': needs {num_stages} positive round counts "
                              f"(one per stage), got {list(lw.schedule)}; fix the list or set it to []")
        rounds = tuple(lw.schedule)
    elif lw.rounds_per_stage:
        rounds = (lw.rounds_per_stage,) * num_stages
    else:
        if cfg.rounds < num_stages:
            raise ConfigError(f"config key 'rounds': {cfg.rounds} rounds cannot cover {num_stages} stages; "
                              f"set rounds >= {num_stages}")
        base, extra = divmod(cfg.rounds, num_stages)
        rounds = tuple(base + (1 if s < extra else 0) for s in range(num_stages))
    if sum(rounds) != cfg.rounds:
        raise ConfigError(f"config key 'rounds': {cfg.rounds} differs from the stage schedule's {sum(rounds)} "
                          f"({num_stages} stages x rounds {list(rounds)}); set rounds = {sum(rounds)}")
    return rounds


@dataclass(frozen=True)
class StageSchedule:
    """Which layers are active / frozen / unbuilt in each round.

    ``stage_ends[s]``: layers used by stage s; ``stage_rounds[s]``: its rounds.
    """

    stage_ends: tuple[int, ...]
    stage_rounds: tuple[int, ...]
    mode: str = "layerwise"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown stage mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if len(self.stage_ends) != len(self.stage_rounds) or not self.stage_ends:
            raise ConfigError("a stage schedule needs one round count per stage; fix layerwise.schedule")
        if list(self.stage_ends) != sorted(set(self.stage_ends)) or self.stage_ends[0] < 1:
            raise ConfigError(f"stage ends {self.stage_ends} must increase strictly from >= 1")

    @classmethod
    def build(cls, ends_of_units: Sequence[int], blocks_per_stage: int, rounds: Sequence[int] | None = None, *,
              cfg: RunConfig | None = None, mode: str = "layerwise") -> StageSchedule:
        """Group units into stages (the last may be shorter); rounds given, or from cfg (see ``stage_rounds``)."""
        if blocks_per_stage < 1:
            raise ConfigError("config key 'layerwise.blocks_per_stage': must be >= 1")
        ends = tuple(ends_of_units[min(i + blocks_per_stage, len(ends_of_units)) - 1]
                     for i in range(0, len(ends_of_units), blocks_per_stage))
        if rounds is None:
            if cfg is None:
                raise ValueError("pass the rounds of each stage or a config")
            rounds = stage_rounds(cfg, len(ends))
        return cls(ends, tuple(int(r) for r in rounds), mode)

    @classmethod
    def from_config(cls, cfg: RunConfig, encoder: Encoder | None = None, *, mode: str = "layerwise") -> StageSchedule:
        """The schedule of a run; without an encoder, ViT/ResNet unit ends are derived from ``cfg.model``."""
        return cls.build(_unit_ends_of(cfg, encoder), cfg.layerwise.blocks_per_stage, cfg=cfg, mode=mode)

    @classmethod
    def single(cls, cfg: RunConfig, encoder: Encoder | None = None) -> StageSchedule:
        """ONE stage of every unit over all rounds (end-to-end training; ``[layerwise]`` does not apply)."""
        return cls((_unit_ends_of(cfg, encoder)[-1],), (cfg.rounds,), "layerwise")

    @property
    def num_stages(self) -> int:
        return len(self.stage_ends)

    @property
    def total_rounds(self) -> int:
        return sum(self.stage_rounds)

    def first_round(self, stage: int) -> int:
        """Round index (0-based) at which ``stage`` begins."""
        return sum(self.stage_rounds[:stage])

    def stage_index(self, round_index: int) -> int:
        """The stage of a round (rounds past the end stay in the last stage)."""
        starts = [self.first_round(s) for s in range(self.num_stages)]
        return max(0, bisect.bisect_right(starts, round_index) - 1)

    def stage(self, index: int) -> Stage:
        depth = self.stage_ends[index]
        first = 0 if (self.mode == "progressive" or index == 0) else self.stage_ends[index - 1]
        bypassed = tuple(range(1, first)) if self.mode == "independent" else ()  # all but the stem
        return Stage(index, depth, first, bypassed)

    def at_round(self, round_index: int) -> Stage:
        return self.stage(self.stage_index(round_index))

    def last(self) -> Stage:
        return self.stage(self.num_stages - 1)

    def progress(self, round_index: int) -> float:
        """Fraction of its stage done before ``round_index``: 0 at a stage's first round (per-stage LR schedule)."""
        s = self.stage_index(round_index)
        return (round_index - self.first_round(s)) / self.stage_rounds[s]


def _unit_ends_of(cfg: RunConfig, encoder: Encoder | None) -> list[int]:
    """Unit ends of the encoder, or of the configured backbone without building it."""
    if encoder is not None:
        return unit_ends(encoder)
    if cfg.model.arch == "vit":
        return list(range(2, cfg.model.depth + 2))
    return list(_accumulate(cfg.model.blocks_per_stage, start=1))


def _accumulate(values: Iterable[int], start: int) -> Iterator[int]:
    total = start
    for v in values:
        total += int(v)
        yield total


# ---------------------------------------------------------------- who holds which version of a layer


class LayerVersions:
    """Which layers a client must download: the server's version of each layer vs the client's last sync.

    ``touch(layers)`` records one server update that changed ``layers``; ``sync(client, layers)``
    returns those of ``layers`` changed since the client's last sync (all of them for a client
    that never synced: a late joiner) and marks it synced. Sparse in clients (10,000 is cheap).
    """

    def __init__(self, num_layers: int) -> None:
        self.version = 0  # server updates so far
        self.layer_version = [0] * num_layers  # update at which each layer last changed
        self.client_version: dict[int, int] = {}  # server version at a client's last download

    def touch(self, layers: Iterable[int]) -> None:
        self.version += 1
        for i in layers:
            self.layer_version[i] = self.version

    def retouch(self, layers: Iterable[int]) -> None:
        """More layers changed in the CURRENT update (e.g. server calibration after the aggregation)."""
        for i in layers:
            self.layer_version[i] = self.version

    def sync(self, client: int, layers: Iterable[int]) -> list[int]:
        have = self.client_version.get(client, -1)
        self.client_version[client] = self.version
        return [i for i in layers if self.layer_version[i] > have]

    def state_dict(self) -> dict[str, Tensor | int]:
        clients = sorted(self.client_version)
        return {"version": self.version, "layer_version": torch.tensor(self.layer_version, dtype=torch.int64),
                "client_ids": torch.tensor(clients, dtype=torch.int64),
                "client_versions": torch.tensor([self.client_version[c] for c in clients], dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.version = int(state["version"])
        self.layer_version = [int(v) for v in state["layer_version"]]
        self.client_version = dict(zip(state["client_ids"].tolist(), state["client_versions"].tolist()))


# ---------------------------------------------------------------- the state-dict keys of layers


def layer_prefixes(prefix: str, layers: Iterable[int]) -> tuple[str, ...]:
    """State-dict key prefixes of the given layers, e.g. ``("encoder.backbone.layers.3.",)``."""
    return tuple(f"{prefix}layers.{i}." for i in layers)


def select_state(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """The entries of a state dict whose key starts with one of ``prefixes`` (the payload of some layers)."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


__all__ = ["LayerVersions", "MODES", "Stage", "StageSchedule", "layer_prefixes", "select_state", "stage_rounds",
           "unit_ends"]
