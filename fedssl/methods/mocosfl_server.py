"""MocoSFL's server role: ``encoder.layers[cut:]`` + pool + MoCo v2 projector, their momentum copy, SGD, the queue(s).

A server step takes the concatenated activations of the step's clients (vector concatenation),
runs its layers and the symmetric InfoNCE against the queue (the reference's symmetric loss: each
activation set is once the query and once the key), updates its weights and momentum copy,
enqueues both key sets, and returns the gradient w.r.t. the concatenated queries, sliced per
client. The sync's average of the clients' nets lands in the global encoder's first ``cut`` layers
(and, with ``split.sync_momentum``, in the momentum encoder's).

Queue-only negatives as in MoCo v2 once the shared queue holds keys (in-batch negatives only while it
is empty), whatever ``ssl.in_batch_negatives`` says. The per-client queue option gives each client
``queue_size // clients`` keys (the reference's split of the same memory); a client whose own queue is
still empty contributes a zero loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedssl.config import RunConfig
from fedssl.losses import symmetric_info_nce
from fedssl.methods.base import Payload
from fedssl.methods.mocosfl_client import MOMENTUM, ONLINE, nets_payload, part
from fedssl.models.encoder import Encoder
from fedssl.models.heads import mocov2_projector
from fedssl.models.momentum import deactivate_requires_grad, ema_update
from fedssl.models.ssl import NegativeQueue
from fedssl.training import make_optimizer


def banked_info_nce(query: Tensor, key: Tensor, negatives: Tensor, valid: Tensor, *, temperature: float) -> Tensor:
    """InfoNCE where each client's queries see only that client's negatives.

    query, key: (n, M, d); negatives: (n, K, d) normalised keys; valid: (n, K) which of them exist.
    A query with no valid negative has loss 0. Returns the mean over all n*M queries.
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(key, dim=-1)
    positive = (q * k).sum(dim=-1, keepdim=True)  # (n, M, 1)
    negative = torch.bmm(q, negatives.to(q.dtype).transpose(1, 2))  # (n, M, K)
    negative = negative.masked_fill(~valid.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=-1).flatten(0, 1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


@dataclass
class ServerStepResult:
    loss: float
    grad: Tensor  # (n, B, ...) gradient of the loss w.r.t. each client's query activations


class MocoSFLServer:
    """The server's part: ``encoder.layers[cut:]`` + pool + projector, their momentum copy, SGD, the queue(s).

    ``encoder`` is the GLOBAL encoder (shared with the method): its first ``cut`` layers hold the averaged
    client-net and are not trained here.
    """

    def __init__(self, encoder: Encoder, cut: int, cfg: RunConfig, num_clients: int, per_client_queue: bool) -> None:
        self.encoder, self.cut, self.cfg = encoder, cut, cfg
        self.projector = mocov2_projector(encoder.feature_dim, cfg.ssl.proj_hidden, cfg.ssl.proj_dim).to(
            next(encoder.parameters()).device)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        deactivate_requires_grad(self.momentum_encoder)
        deactivate_requires_grad(self.momentum_projector)
        self.optimizer = make_optimizer(self.parameters(), cfg, cfg.lr)
        if per_client_queue:
            self.queue = NegativeQueue(max(1, cfg.ssl.queue_size // num_clients), cfg.ssl.proj_dim, banks=num_clients)
        else:
            self.queue = NegativeQueue(cfg.ssl.queue_size, cfg.ssl.proj_dim)
        self.per_client_queue = per_client_queue
        self.queue.to(next(encoder.parameters()).device)

    def _trained(self, encoder: Encoder, projector: nn.Module) -> nn.ModuleList:
        return nn.ModuleList([*encoder.layers[self.cut:], encoder.norm, projector])

    def parameters(self) -> list[nn.Parameter]:
        return list(self._trained(self.encoder, self.projector).parameters())

    def embed(self, activations: Tensor, *, momentum: bool = False) -> Tensor:
        """(N, ...) activations at the cut -> (N, proj_dim) L2-normalised projections."""
        encoder, projector = ((self.momentum_encoder, self.momentum_projector) if momentum
                              else (self.encoder, self.projector))
        return F.normalize(projector(encoder.forward_from(activations, self.cut)), dim=1)

    def loss(self, zq: Tensor, mk: Tensor, zk: Tensor, mq: Tensor, clients: Tensor) -> Tensor:
        """Symmetric InfoNCE: (zq vs mk) and (zk vs mq), all (N, d), N = n clients x B images."""
        t = self.cfg.ssl.temperature
        if not self.per_client_queue:
            empty = self.queue.size == 0 or int(self.queue.length[0]) == 0
            negatives = None if self.queue.size == 0 else self.queue.negatives()
            return symmetric_info_nce(zq, mk, zk, mq, negatives, temperature=t, in_batch_negatives=empty)
        n = clients.shape[0]
        negatives, valid = self.queue.banked_negatives(clients)
        per = [z.unflatten(0, (n, -1)) for z in (zq, mk, zk, mq)]
        return 0.5 * (banked_info_nce(per[0], per[1], negatives, valid, temperature=t)
                      + banked_info_nce(per[2], per[3], negatives, valid, temperature=t))

    def step(self, query: Tensor, key: Tensor, clients: Tensor, lr: float) -> ServerStepResult:
        """One server step on the concatenated activations: query, key (n, B, ...) from the n clients ``clients``."""
        n = query.shape[0]
        q_in = query.detach().flatten(0, 1).requires_grad_()  # what arrived: (N, ...), N = n * B
        k_in = key.detach().flatten(0, 1)
        size = q_in.shape[0]
        z = self.embed(torch.cat([q_in, k_in]))  # (2N, d) online: both sets as queries
        with torch.no_grad():
            m = self.embed(torch.cat([k_in, q_in]), momentum=True)  # (2N, d) momentum: both sets as keys
        zq, zk, mk, mq = z[:size], z[size:], m[:size], m[size:]
        loss = self.loss(zq, mk, zk, mq, clients)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        tau = self.cfg.ssl.momentum
        ema_update(self._trained(self.momentum_encoder, self.momentum_projector),
                   self._trained(self.encoder, self.projector), tau)
        if self.per_client_queue:
            self.queue.enqueue(torch.cat([mk.unflatten(0, (n, -1)), mq.unflatten(0, (n, -1))], dim=1), clients)
        else:
            self.queue.enqueue(torch.cat([mk, mq]))
        assert q_in.grad is not None
        return ServerStepResult(float(loss.detach()), q_in.grad.unflatten(0, query.shape[:2]))

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "projector": self.projector.state_dict(),
                "momentum_encoder": self.momentum_encoder.state_dict(),
                "momentum_projector": self.momentum_projector.state_dict(),
                "optimizer": self.optimizer.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.projector.load_state_dict(state["projector"])
        self.momentum_encoder.load_state_dict(state["momentum_encoder"])
        self.momentum_projector.load_state_dict(state["momentum_projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queue.load_state_dict(state["queue"])



    # -------------------------------------------------------------- the client-nets it averages

    def client_nets(self, *, momentum: bool) -> dict[str, nn.Module]:
        """The first ``cut`` layers of the global encoder (the averaged client-net) and of its momentum copy."""
        nets = {ONLINE: nn.Sequential(*self.encoder.layers[:self.cut])}
        if momentum:
            nets[MOMENTUM] = nn.Sequential(*self.momentum_encoder.layers[:self.cut])
        return nets

    def latest(self, *, momentum: bool) -> Payload:
        """The averaged client-nets a client must hold: ``online/<name>`` (and ``momentum/<name>``)."""
        nets = {k: {n: p.detach().clone() for n, p in net.named_parameters()}
                for k, net in self.client_nets(momentum=momentum).items()}
        return nets_payload(nets[ONLINE], nets.get(MOMENTUM))

    @torch.no_grad()
    def average(self, nets: dict[str, Tensor]) -> None:
        """FedAvg of the uploaded client-nets (n, ...) into the global encoder's (and momentum encoder's) layers."""
        for prefix, net in self.client_nets(momentum=bool(part(nets, MOMENTUM))).items():
            stacked = part(nets, prefix)
            for name, p in net.named_parameters():
                p.copy_(stacked[name].to(p.device, p.dtype).mean(dim=0))
