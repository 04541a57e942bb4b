"""An encoder and SSL model trained stage by stage (the schedule: ``fedssl.stages``).

:class:`StagedEncoder` runs the stage's frozen layers without grad (``trunk``) and its active ones
with it; :class:`StagedModel` moves an SSL model (or the MAE) and its momentum copies to a stage and
says what a client holds and exchanges at it; :class:`TruncatedEncoder` is the first layers of a
backbone, what a staged run evaluates before its last stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from fedssl.models.encoder import Encoder
from fedssl.models.ssl import SSLModel
from fedssl.stages import Stage, layer_prefixes


def set_trainable(modules: Iterable[nn.Module], trainable: bool) -> None:
    """Toggle ``requires_grad``; freezing also drops any gradient left from training (memory a client frees)."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None


def run_frozen(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``layers`` in order, in eval mode under ``torch.no_grad()`` (no activations kept, no statistics updated)."""
    for layer in layers:
        layer.train(False)  # BatchNorm of a frozen layer must not update its statistics
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
    return x


def forward_frozen(encoder: Encoder, x: Tensor, stage: Stage) -> Tensor:
    """The stage's frozen layers without grad: (N, C, H, W) -> the first active layer's input."""
    return run_frozen([encoder.layers[i] for i in stage.frozen], x)


def make_adapter(in_dim: int, out_dim: int) -> nn.Module:
    """Temporary head-side adapter of a stage: identity where widths agree, else a linear map (N, in) -> (N, out)."""
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)


class StagedEncoder(nn.Module):
    """A backbone trained stage by stage; ``forward`` takes the FROZEN part's output (see ``trunk``).

    ``trunk(x)``: the frozen layers (no grad) -> h; ``forward(h)``: active layers, pool and the
    stage's adapter -> (N, feature_dim). Splitting the two lets the online and the momentum
    branch share ONE frozen forward per view (they hold the same frozen weights by construction).
    While ``record`` is a list, every output of ``forward`` is appended to it (alignment reuses them).
    """

    def __init__(self, backbone: Encoder, stage_ends: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        dims = backbone.layer_dims()
        self.feature_dim = backbone.feature_dim
        self.adapters = nn.ModuleList(make_adapter(dims[end - 1], self.feature_dim) for end in stage_ends)
        self.stage = Stage(0, stage_ends[0], 0)
        self.record: list[Tensor] | None = None

    def set_stage(self, stage: Stage) -> None:
        """Use ``stage``: only its active layers, the final norm and its adapter require grad."""
        self.stage = stage
        set_trainable([self.backbone, self.adapters], False)
        set_trainable([self.backbone.layers[i] for i in stage.active], True)
        set_trainable([self.backbone.norm, self.adapters[stage.index]], True)

    def trunk(self, x: Tensor) -> Tensor:
        return forward_frozen(self.backbone, x, self.stage)

    def forward(self, h: Tensor) -> Tensor:
        s = self.stage
        z = self.adapters[s.index](self.backbone.pool(self.backbone.run_layers(h, s.first_active, s.depth)))
        if self.record is not None:
            self.record.append(z)
        return z  # (N, feature_dim)

    def active_prefixes(self, prefix: str) -> tuple[str, ...]:
        """Key prefixes of what is trained and exchanged now: active layers, final norm, the stage's adapter."""
        s = self.stage
        return layer_prefixes(prefix + "backbone.", s.active) + (f"{prefix}backbone.norm.",
                                                                 f"{prefix}adapters.{s.index}.")

    def held_modules(self) -> list[nn.Module]:
        """What a client holds at this stage: the used layers, the norm and the stage's adapter."""
        return [*(self.backbone.layers[i] for i in self.stage.held), self.backbone.norm, self.adapters[self.stage.index]]

    def active_modules(self) -> list[nn.Module]:
        """The trained part at this stage: active layers, the norm and the stage's adapter."""
        s = self.stage
        return [*(self.backbone.layers[i] for i in s.active), self.backbone.norm, self.adapters[s.index]]


class StagedModel(SSLModel):
    """Mixin over an ``SSLModel`` (or the MAE) whose ``encoder`` is a ``StagedEncoder``: the stage plumbing.

    ``set_stage`` moves the online encoder, its momentum copies and the alignment reference
    (if any) to a stage; only the active part of the encoder and the heads are exchanged;
    ``held_modules`` is what a client holds at the stage (for memory measurement).
    """

    encoder: StagedEncoder

    @property
    def reference(self) -> StagedEncoder | None:
        """The received global encoder (alignment target), or None."""
        return getattr(self, "_reference", None)

    def set_reference(self, reference: StagedEncoder | None) -> None:
        """A plain attribute, not a submodule: never in ``state_dict``, never sent."""
        object.__setattr__(self, "_reference", reference)

    def set_stage(self, stage: Stage) -> None:
        """Online encoder: stage + requires_grad; momentum encoders and the reference: the same stage, never trainable."""
        self.encoder.set_stage(stage)
        for target, online in self.momentum_pairs:
            if online == "encoder":
                getattr(self, target).stage = stage
        if self.reference is not None:
            self.reference.stage = stage

    def exchanged_prefixes(self) -> tuple[str, ...]:
        heads = tuple(f"{name}." for name in self.online_names if name != "encoder")
        return self.encoder.active_prefixes("encoder.") + heads

    def held_modules(self) -> list[nn.Module]:
        """Held layers, norm, adapter, every other online module (heads, decoder), momentum encoders' active part."""
        encoders = {"encoder"} | {target for target, online in self.momentum_pairs if online == "encoder"}
        held = self.encoder.held_modules()
        for target in encoders - {"encoder"}:
            held += getattr(self, target).active_modules()
        return held + [module for name, module in self.named_children() if name not in encoders]


class TruncatedEncoder(Encoder):
    """The first ``depth`` layers of a backbone as an ``Encoder`` (shared modules): images -> pooled (N, D_depth).

    What a staged run evaluates before its last stage; ``pool`` is the backbone's own.
    """

    def __init__(self, backbone: Encoder, depth: int) -> None:
        dims = backbone.layer_dims()[:depth]
        super().__init__(list(backbone.layers[:depth]), dims, feature_dim=dims[-1], norm=backbone.norm)
        object.__setattr__(self, "_pool", backbone.pool)  # a bound method, not a submodule

    def pool(self, h: Tensor) -> Tensor:
        return self._pool(h)


def encoder_at(backbone: Encoder, depth: int) -> Encoder:
    """The backbone itself when every layer is used, else its first ``depth`` layers."""
    return backbone if depth >= backbone.num_layers() else TruncatedEncoder(backbone, depth)


__all__ = ["StagedEncoder", "StagedModel", "TruncatedEncoder", "encoder_at", "forward_frozen", "make_adapter",
           "run_frozen", "set_trainable"]
