"""Self-supervised models: an encoder, its heads, an optional momentum branch and one loss.

Every federated method trains one of these. What is *exchanged* with the server
is a subset of the state dict (``exchanged_state``); local state (the MoCo
queue, and the momentum branch unless ``exchange_momentum``) never leaves the
client.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedssl.config import SSLConfig
from fedssl.losses import byol_loss, info_nce, nt_xent
from fedssl.models.encoder import Encoder
from fedssl.models.heads import byol_head, mocov2_projector, mocov3_predictor, mocov3_projector, simclr_projector
from fedssl.models.momentum import copy_weights, deactivate_requires_grad, ema_update


class SSLModel(nn.Module, ABC):
    """Encoder + heads; ``online_names`` are trained, ``momentum_pairs`` follow them by EMA."""

    online_names: tuple[str, ...] = ("encoder", "projector")
    momentum_pairs: tuple[tuple[str, str], ...] = ()  # (momentum module, online module it follows)

    def __init__(self, encoder: Encoder, cfg: SSLConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg

    def _add_momentum_branch(self) -> None:
        """Momentum copies of every online module named in ``momentum_pairs``."""
        for target, online in self.momentum_pairs:
            branch = copy.deepcopy(getattr(self, online))
            deactivate_requires_grad(branch)
            setattr(self, target, branch)

    @abstractmethod
    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Symmetric SSL loss of two augmented views (N, C, H, W) of the same images."""

    def after_step(self) -> None:
        """After each optimizer step: move the momentum branch towards the online one."""
        for target, online in self.momentum_pairs:
            ema_update(getattr(self, target), getattr(self, online), self.cfg.momentum)

    def start_round(self) -> None:
        """Before a client's local training: reset local state; re-copy the momentum branch if not exchanged."""
        if not self.cfg.exchange_momentum:
            for target, online in self.momentum_pairs:
                copy_weights(getattr(self, target), getattr(self, online))

    def exchanged_prefixes(self) -> tuple[str, ...]:
        names = self.online_names
        if self.cfg.exchange_momentum:
            names = names + tuple(target for target, _ in self.momentum_pairs)
        return tuple(name + "." for name in names)

    def exchanged_state(self) -> dict[str, Tensor]:
        """The tensors that cross the wire (detached views of the live weights)."""
        prefixes = self.exchanged_prefixes()
        return {k: v.detach() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def load_exchanged_state(self, state: dict[str, Tensor]) -> None:
        own = self.state_dict()
        expected = set(self.exchanged_state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"payload keys do not match the model (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.online_names for p in getattr(self, name).parameters() if p.requires_grad]


def _normalized(x: Tensor) -> Tensor:
    return F.normalize(x, dim=1)


class NegativeQueue(nn.Module):
    """FIFO queues of negative keys (MoCo): ``banks`` independent queues of up to ``size`` keys of width ``dim``.

    One bank is MoCo v2's queue and MocoSFL's shared server queue (feature sharing);
    one bank per client is MocoSFL's per-client option. New keys overwrite the
    oldest; a bank's negatives are the keys it holds so far (in storage order).
    """

    keys: Tensor
    length: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, banks: int = 1) -> None:
        super().__init__()
        if size < 0 or dim < 1 or banks < 1:
            raise ValueError(f"a queue needs size >= 0, dim >= 1 and banks >= 1 (got {size}, {dim}, {banks})")
        self.size = int(size)
        self.register_buffer("keys", torch.zeros(banks, size, dim))  # (banks, K, d) normalised keys
        self.register_buffer("length", torch.zeros(banks, dtype=torch.long))  # (banks,) keys held
        self.register_buffer("ptr", torch.zeros(banks, dtype=torch.long))  # (banks,) next write position

    @torch.no_grad()
    def enqueue(self, keys: Tensor, banks: Tensor | None = None) -> None:
        """Write keys (M, d) into bank 0, or keys (n, M, d) into the n distinct ``banks`` (n,).

        Each bank writes at its pointer and wraps around; with more than ``size`` keys only the newest are kept.
        """
        if self.size == 0:
            return
        if banks is None:
            keys, banks = keys.unsqueeze(0), torch.zeros(1, dtype=torch.long, device=self.keys.device)
        keys = keys[:, -self.size:]  # (n, m, d)
        m = keys.shape[1]
        start = self.ptr[banks]  # (n,)
        positions = (start.unsqueeze(1) + torch.arange(m, device=start.device)) % self.size  # (n, m)
        self.keys[banks.unsqueeze(1), positions] = keys.to(self.keys.dtype)
        self.ptr[banks] = (start + m) % self.size
        self.length[banks] = (self.length[banks] + m).clamp_max(self.size)

    def negatives(self, bank: int = 0) -> Tensor:
        """(L, d): the keys one bank holds (L <= size)."""
        return self.keys[bank, : int(self.length[bank])]

    def banked_negatives(self, banks: Tensor) -> tuple[Tensor, Tensor]:
        """Keys of several banks (n,): (n, size, d) and the (n, size) mask of the slots that hold a key."""
        valid = torch.arange(self.size, device=self.keys.device) < self.length[banks].unsqueeze(1)
        return self.keys[banks], valid

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every key."""
        self.length.zero_()
        self.ptr.zero_()


def _upgrade_queue_keys(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    """Load checkpoints written before the queue became a NegativeQueue (keys queue, queue_len, queue_ptr)."""
    if prefix + "queue" in state and prefix + "queue.keys" not in state:
        state[prefix + "queue.keys"] = state.pop(prefix + "queue").unsqueeze(0)
        state[prefix + "queue.length"] = state.pop(prefix + "queue_len").reshape(1)
        state[prefix + "queue.ptr"] = state.pop(prefix + "queue_ptr").reshape(1)


class MoCoV2(SSLModel):
    """MoCo v2: 2-layer MLP projector, momentum encoder, a FIFO queue of negative keys."""

    momentum_pairs = (("momentum_encoder", "encoder"), ("momentum_projector", "projector"))

    def __init__(self, encoder: Encoder, cfg: SSLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = mocov2_projector(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        self._add_momentum_branch()
        self.queue = NegativeQueue(cfg.queue_size, cfg.proj_dim)  # normalised keys of earlier batches
        self.register_load_state_dict_pre_hook(_upgrade_queue_keys)
        self._pending_keys: Tensor | None = None

    def _keys(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return _normalized(self.momentum_projector(self.momentum_encoder(x)))  # (N, d)

    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        q1 = _normalized(self.projector(self.encoder(view1)))  # (N, d)
        q2 = _normalized(self.projector(self.encoder(view2)))
        k1, k2 = self._keys(view1), self._keys(view2)
        negatives = self.queue.negatives() if self.cfg.queue_size else None
        t, inb = self.cfg.temperature, self.cfg.in_batch_negatives
        loss = 0.5 * (info_nce(q1, k2, negatives, temperature=t, in_batch_negatives=inb)
                      + info_nce(q2, k1, negatives, temperature=t, in_batch_negatives=inb))
        self._pending_keys = torch.cat([k1, k2])  # (2N, d), enqueued after the optimizer step
        return loss

    def enqueue(self, keys: Tensor) -> None:
        """FIFO: keys (M, d) join the queue; the oldest are overwritten."""
        self.queue.enqueue(keys)

    def after_step(self) -> None:
        super().after_step()
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None

    def start_round(self) -> None:
        super().start_round()
        self.queue.reset()


class MoCoV3(SSLModel):
    """MoCo v3: 3-layer BN projector, 2-layer predictor, in-batch InfoNCE scaled by 2T, no queue."""

    online_names = ("encoder", "projector", "predictor")
    momentum_pairs = (("momentum_encoder", "encoder"), ("momentum_projector", "projector"))

    def __init__(self, encoder: Encoder, cfg: SSLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = mocov3_projector(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mocov3_predictor(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self._add_momentum_branch()

    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        p1 = self.predictor(self.projector(self.encoder(view1)))  # (N, d)
        p2 = self.predictor(self.projector(self.encoder(view2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(view1))
            k2 = self.momentum_projector(self.momentum_encoder(view2))
        t = self.cfg.temperature
        return 2 * t * (info_nce(p1, k2, temperature=t) + info_nce(p2, k1, temperature=t))


class SimCLR(SSLModel):
    """SimCLR: projector + NT-Xent with the 2N-2 other views as negatives; no momentum branch."""

    def __init__(self, encoder: Encoder, cfg: SSLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = simclr_projector(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)

    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        z1 = self.projector(self.encoder(view1))  # (N, d)
        z2 = self.projector(self.encoder(view2))
        return nt_xent(z1, z2, temperature=self.cfg.temperature)


class BYOL(SSLModel):
    """BYOL: online encoder + projector + predictor regress the EMA target's projection."""

    online_names = ("encoder", "projector", "predictor")
    momentum_pairs = (("target_encoder", "encoder"), ("target_projector", "projector"))

    def __init__(self, encoder: Encoder, cfg: SSLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = byol_head(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = byol_head(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self._add_momentum_branch()

    def loss(self, view1: Tensor, view2: Tensor) -> Tensor:
        p1 = self.predictor(self.projector(self.encoder(view1)))  # (N, d)
        p2 = self.predictor(self.projector(self.encoder(view2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(view1))
            z2 = self.target_projector(self.target_encoder(view2))
        return byol_loss(p1, z2) + byol_loss(p2, z1)


SSL_MODELS: dict[str, type[SSLModel]] = {"mocov2": MoCoV2, "mocov3": MoCoV3, "simclr": SimCLR, "byol": BYOL}


def build_ssl_model(objective: str, encoder: Encoder, cfg: SSLConfig) -> SSLModel:
    return SSL_MODELS[objective](encoder, cfg)
