"""MocoSFL: split federated learning + MoCo (Li et al., ICLR 2023), simulated with stacked client nets.

The ResNet is cut after ``split.cut`` layers (1 = the stem only). Every client
holds an online client-net and its momentum copy; the server holds the rest of
the network, the MoCo v2 projector, their momentum copy and ONE shared queue of
negative keys. A step, for the step's active clients:

1. client forward (:meth:`MocoSFL.client_forward`): two MoCo v2 views of the
   client's ``client_batch`` images; query activations ``online(x1)`` (graph
   kept on the client) and key activations ``momentum(x2)`` go up;
2. server step (:meth:`MocoSFLServer.step`): the activations of all clients are
   concatenated into one batch (vector concatenation); the server runs its
   layers, the symmetric InfoNCE against the queue (the reference's symmetric
   loss: each activation set is once the query and once the key), updates its
   weights and momentum copy, enqueues both key sets, and returns the gradient
   w.r.t. the concatenated queries, sliced per client (it goes down);
3. client update (:meth:`MocoSFL.client_update`): backward of that gradient,
   SGD step, EMA of the momentum client-net;
4. every ``sync_every`` steps (= one round) :meth:`MocoSFL.sync` averages the
   client-nets of the round's clients (online, and momentum if
   ``split.sync_momentum``; the reference code averages the online nets only)
   and broadcasts the average.

All clients of a step run in one call on stacked weights (``fedssl.models.stacked``);
``split.simulate = "loop"`` runs the same functions one client at a time (the
baseline of the speed benchmark and of the equivalence test).

Designed here (not fixed by the paper): the LR of clients and server follows the
run's per-round schedule; per-client SGD state persists across rounds and is
never averaged; a client that sat out rounds fetches the latest client-net when
it next joins (counted in the ledger); the per-client queue option gives each
client ``queue_size // clients`` keys (the reference's split of the same memory);
a client whose own queue is still empty contributes a zero loss. Queue-only
negatives as in MoCo v2 once the shared queue holds keys (in-batch negatives
only while it is empty), whatever ``ssl.in_batch_negatives`` says.

``split.auto_adjust`` reproduces the reference scripts' choice for N clients:
``client_batch = 100 // N`` for N <= 50 else 1; ``clients_per_step = 100 / N``
for N >= 200 (about 100 images per server step) else 1. It picks only what depends
on N: ``sync_every`` stays the config's (its default, 50, is the reference's), so
``--set split.sync_every=...`` shortens a round of a preset that auto-adjusts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedssl.config import RunConfig, SplitConfig
from fedssl.data.datasets import ImageData
from fedssl.errors import ConfigError, DivergedError
from fedssl.losses import symmetric_info_nce
from fedssl.methods.base import MethodContext, SplitMethod, build_augment, build_backbone
from fedssl.models.encoder import Encoder
from fedssl.models.heads import mocov2_projector
from fedssl.models.momentum import deactivate_requires_grad, ema_update
from fedssl.models.ssl import NegativeQueue
from fedssl.models.stacked import (Stack, batched_forward, broadcast_, gather, scatter_, stack_mean, stack_module,
                                   stacked_ema_, stacked_sgd_step_, to_stacked, unstack, zeros_like_stack)
from fedssl.resources import DOWNLOAD, SERVER_ID, SERVER_STEP_COST, UPLOAD, Ledger, StepCost, measure_step, payload_bytes, tensor_bytes
from fedssl.training import derive_seed, make_optimizer, round_lr

AUTO_SERVER_BATCH = 100  # auto_adjust: images per server step the reference scripts aim at


def effective_split(split: SplitConfig, num_clients: int) -> SplitConfig:
    """The split settings in force: the config's, or with auto_adjust the reference scripts' client batch and
    clients per step for N clients (``sync_every`` is always the config's)."""
    if not split.auto_adjust:
        return split
    batch = max(1, AUTO_SERVER_BATCH // num_clients) if num_clients <= 50 else 1
    fraction = min(1.0, AUTO_SERVER_BATCH / num_clients) if num_clients >= 200 else 1.0
    return replace(split, client_batch=batch, clients_per_step=fraction)


def check_cut(encoder: Encoder, cut: int) -> None:
    """The client must hold at least the stem and the server at least one layer."""
    layers = encoder.num_layers()
    if not 1 <= cut < layers:
        raise ConfigError(f"config key 'split.cut': {cut} is out of range for a backbone of {layers} layers "
                          f"(stem + blocks); choose 1 <= split.cut <= {layers - 1}")


# ------------------------------------------------------------------ the clients' data


@dataclass(frozen=True)
class ClientImages:
    """Every client's images in one client-major tensor, so a step's batches are one index operation."""

    images: Tensor  # (M, C, H, W) uint8: client 0's images, then client 1's, ...
    offsets: Tensor  # (N,) first row of each client
    sizes: Tensor  # (N,) images per client
    owner: Tensor  # (M,) the client of each row

    @classmethod
    def collect(cls, client_data: Callable[[int], ImageData], num_clients: int) -> ClientImages:
        parts = [client_data(i).images for i in range(num_clients)]
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        if int(sizes.min()) < 1:
            raise ConfigError("a client holds no images; use fewer clients or another partition")
        offsets = torch.cumsum(sizes, 0) - sizes
        owner = torch.repeat_interleave(torch.arange(num_clients), sizes)
        return cls(torch.cat(parts), offsets, sizes, owner)

    def shuffled_order(self, generator: torch.Generator) -> Tensor:
        """(M,) row order that keeps each client's rows in its own range, shuffled within it (one sort)."""
        noise = torch.rand(len(self.owner), generator=generator, dtype=torch.float64)
        return torch.argsort(self.owner.double() + noise)

    def batch_rows(self, order: Tensor, clients: Tensor, served: Tensor, batch: int) -> Tensor:
        """(n, B) rows for the clients (n,): each takes its next ``batch`` images in ``order``.

        ``served`` (n,) counts the batches each client already took this round; a client cycles through its images.
        """
        position = (served.unsqueeze(1) * batch + torch.arange(batch)) % self.sizes[clients].unsqueeze(1)
        return order[self.offsets[clients].unsqueeze(1) + position]


# ------------------------------------------------------------------ the server


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


# ------------------------------------------------------------------ the method


# ------------------------------------------------------------------ a client's part of a step


def forward_at_cut(template: nn.Module, online: Stack, momentum: Stack, view1: Tensor, view2: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Views (n, B, C, H, W) of n clients -> query activations online(x1) (with grad), keys momentum(x2)."""
    query = batched_forward(template, online, view1)
    with torch.no_grad():
        key = batched_forward(template, momentum, view2)
    return query, key


def update_from_gradient(query: Tensor, grad: Tensor, online: Stack, momentum: Stack, buffers: Stack, *, lr: float,
                         cfg: RunConfig) -> None:
    """Back-propagate the server's gradient (n, B, ...), SGD step and momentum-net EMA, for every client of the stacks."""
    query.backward(grad)
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in online.items()}
    stacked_sgd_step_(online, grads, buffers, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    for p in online.values():
        p.grad = None
    stacked_ema_(momentum, online, cfg.ssl.momentum)


class _StackedSGDView:
    """The stacked SGD buffers in torch.optim's ``state`` layout, so ``measure_step`` counts (and re-homes) them."""

    def __init__(self, buffers: Stack) -> None:
        self.state = {name: {"momentum_buffer": buf} for name, buf in buffers.items()}

    def buffers(self) -> Stack:
        return {name: s["momentum_buffer"] for name, s in self.state.items()}


class MocoSFL(SplitMethod):
    name = "mocosfl"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        if cfg.model.arch != "resnet" or cfg.model.norm != "group":
            raise ConfigError("mocosfl needs a ResNet with GroupNorm (per-client batches can be 1 image): "
                              "set model.arch = \"resnet\" and model.norm = \"group\"")
        self.num_clients = cfg.clients
        self.split = effective_split(cfg.split, cfg.clients)
        self.cut = cfg.split.cut
        torch.manual_seed(cfg.seed)
        global_encoder = build_backbone(ctx).to(ctx.device)  # layers[:cut]: averaged client-net; the rest: server
        check_cut(global_encoder, self.cut)
        self.server = MocoSFLServer(global_encoder, self.cut, cfg, cfg.clients, self.split.queue == "per_client")
        self.augment = build_augment(ctx)
        # the client side: one template, stacks of weights (C, ...)
        self.client_net = nn.Sequential(*global_encoder.layers[:self.cut])  # shares the global encoder's modules
        self.client_template = to_stacked(self.client_net)
        self.client_online = {k: v.requires_grad_() for k, v in stack_module(self.client_net, cfg.clients).items()}
        self.client_momentum = stack_module(self.client_net, cfg.clients)
        self.client_sgd = zeros_like_stack(self.client_online)  # per-client SGD momentum buffers
        self.holds_latest = torch.zeros(cfg.clients, dtype=torch.bool)  # has the latest client-net (ledger)
        self._data: tuple[Any, ClientImages] | None = None

    # -------------------------------------------------------------- the four pieces of a step

    def client_forward(self, online: Stack, momentum: Stack, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Views (n, B, C, H, W) of n clients -> query activations online(x1) (with grad), keys momentum(x2)."""
        return forward_at_cut(self.client_template, online, momentum, view1, view2)

    def server_step(self, query: Tensor, key: Tensor, clients: Tensor, lr: float) -> ServerStepResult:
        """The server's step on the clients' concatenated activations; returns the per-client gradients."""
        return self.server.step(query, key, clients, lr)

    def client_update(self, query: Tensor, grad: Tensor, online: Stack, momentum: Stack, buffers: Stack,
                      lr: float) -> None:
        """Back-propagate the server's gradient, SGD step and momentum-net EMA, for every client of the stacks."""
        update_from_gradient(query, grad, online, momentum, buffers, lr=lr, cfg=self.cfg)

    @torch.no_grad()
    def sync(self, participants: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """FedAvg of the participants' client-nets, broadcast; the global encoder gets the averaged online net.

        Returns the averaged online (and, with ``sync_momentum``, momentum) weights: what is sent down.
        """
        online = stack_mean(self.client_online, participants)
        broadcast_(self.client_online, online)
        _load(self.client_net, online)
        momentum = None
        if self.split.sync_momentum:
            momentum = stack_mean(self.client_momentum, participants)
            broadcast_(self.client_momentum, momentum)
            _load(nn.Sequential(*self.server.momentum_encoder.layers[:self.cut]), momentum)
        self.holds_latest.zero_()
        self.holds_latest[participants] = True
        return online, momentum

    # -------------------------------------------------------------- a round

    def _client_images(self, client_data: Callable[[int], ImageData], num_clients: int) -> ClientImages:
        source = getattr(client_data, "__self__", client_data)
        if self._data is None or self._data[0] is not source:
            self._data = (source, ClientImages.collect(client_data, num_clients))
        return self._data[1]

    def _active_clients(self, generator: torch.Generator) -> Tensor | None:
        """The step's clients (sorted), drawn uniformly; None = every client."""
        k = max(1, round(self.split.clients_per_step * self.num_clients))
        if k >= self.num_clients:
            return None
        return torch.randperm(self.num_clients, generator=generator)[:k].sort().values

    def _step(self, active: Tensor | None, view1: Tensor, view2: Tensor, lr: float) -> tuple[float, int, int]:
        """One step of the active clients (None = all): the loss, and the bytes one client sent up / got down."""
        clients = active if active is not None else torch.arange(self.num_clients)
        if self.split.simulate == "loop":
            return self._loop_step(clients, view1, view2, lr)
        online = gather(self.client_online, active, requires_grad=True)
        momentum, buffers = gather(self.client_momentum, active), gather(self.client_sgd, active)
        query, key = self.client_forward(online, momentum, view1, view2)
        result = self.server_step(query, key, clients, lr)
        self.client_update(query, result.grad, online, momentum, buffers, lr)
        for stack, part in ((self.client_online, online), (self.client_momentum, momentum),
                            (self.client_sgd, buffers)):
            scatter_(stack, active, part)
        return result.loss, tensor_bytes(query[0]) + tensor_bytes(key[0]), tensor_bytes(result.grad[0])

    def _loop_step(self, clients: Tensor, view1: Tensor, view2: Tensor, lr: float) -> tuple[float, int, int]:
        """The same step one client after another (stacks of one client): the per-client-loop baseline."""
        parts = []
        for j in range(len(clients)):
            index = clients[j:j + 1]
            online = gather(self.client_online, index, requires_grad=True)
            momentum, buffers = gather(self.client_momentum, index), gather(self.client_sgd, index)
            query, key = self.client_forward(online, momentum, view1[j:j + 1], view2[j:j + 1])
            parts.append((index, online, momentum, buffers, query, key))
        result = self.server_step(torch.cat([p[4] for p in parts]), torch.cat([p[5] for p in parts]), clients, lr)
        for j, (index, online, momentum, buffers, query, _) in enumerate(parts):
            self.client_update(query, result.grad[j:j + 1], online, momentum, buffers, lr)
            for stack, part in ((self.client_online, online), (self.client_momentum, momentum),
                                (self.client_sgd, buffers)):
                scatter_(stack, index, part)
        query, key = parts[0][4], parts[0][5]
        return result.loss, tensor_bytes(query[0]) + tensor_bytes(key[0]), tensor_bytes(result.grad[0])

    def train_round(self, round_index: int, client_data: Callable[[int], ImageData], num_clients: int,
                    ledger: Ledger) -> dict[str, Any]:
        if num_clients != self.num_clients:
            raise ConfigError(f"the run has {num_clients} clients but mocosfl was built for {self.num_clients}")
        start = time.perf_counter()
        data = self._client_images(client_data, num_clients)
        device, batch = self.ctx.device, self.split.client_batch
        lr = round_lr(self.cfg, round_index)
        torch.manual_seed(derive_seed(self.cfg.seed, round_index, 0x5F1))  # augmentations (kornia: global RNG)
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, round_index, 0x5F2))
        order = data.shuffled_order(generator)
        served = torch.zeros(num_clients, dtype=torch.long)  # steps each client took this round
        stale = ~self.holds_latest  # these fetch the latest client-net when they first join this round
        loss_sum, images = 0.0, 0
        up_slice = down_slice = 0
        for step in range(self.split.sync_every):
            active = self._active_clients(generator)
            clients = active if active is not None else torch.arange(num_clients)
            rows = data.batch_rows(order, clients, served[clients], batch)  # (n, B)
            served[clients] += 1
            view1, view2 = self.augment(data.images[rows.flatten()].to(device))  # one call for every client
            view1, view2 = view1.unflatten(0, rows.shape), view2.unflatten(0, rows.shape)
            if round_index == 0 and step == 0 and not any(r["kind"] == SERVER_STEP_COST for r in ledger.rows):
                self._record_server_cost(view1, view2, clients, ledger)
            loss, up_slice, down_slice = self._step(active, view1, view2, lr)
            if not np.isfinite(loss):
                raise DivergedError(f"the MocoSFL loss became {loss}; lower the learning rate (--set lr=...)")
            loss_sum += loss
            images += rows.numel()
        participants = torch.nonzero(served).flatten()
        online, momentum = self.sync(participants)
        sent = [online] + ([momentum] if momentum is not None else [])
        weights_down = sum(payload_bytes(w) for w in sent)
        weights_up = sum(payload_bytes(unstack(s, int(participants[0]))) for s in
                         [self.client_online] + ([self.client_momentum] if momentum is not None else []))
        bytes_up = bytes_down = 0
        for client in participants.tolist():
            steps = int(served[client])
            w_down = weights_down * (1 + int(stale[client]))
            up_total = steps * up_slice + weights_up
            down_total = steps * down_slice + w_down
            ledger.record(round=round_index, client=client, kind=UPLOAD, bytes=up_total,
                          activation_bytes=steps * up_slice, weight_bytes=weights_up, steps=steps,
                          samples=steps * batch)
            ledger.record(round=round_index, client=client, kind=DOWNLOAD, bytes=down_total,
                          gradient_bytes=steps * down_slice, weight_bytes=w_down, steps=steps)
            bytes_up, bytes_down = bytes_up + up_total, bytes_down + down_total
        seconds = time.perf_counter() - start
        return {"loss": loss_sum / self.split.sync_every, "clients": int(participants.numel()), "images": images,
                "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0,
                "bytes_up": bytes_up, "bytes_down": bytes_down, "steps": self.split.sync_every}

    # -------------------------------------------------------------- measurement

    def _record_server_cost(self, view1: Tensor, view2: Tensor, clients: Tensor, ledger: Ledger) -> None:
        """Measure one real server step (on a copy) on this step's activations: FLOPs per image and memory."""
        index = None if len(clients) == self.num_clients else clients
        with torch.no_grad():
            query, key = self.client_forward(gather(self.client_online, index), gather(self.client_momentum, index),
                                             view1, view2)
        self.record_server_cost(query, key, clients, ledger)

    def record_server_cost(self, query: Tensor, key: Tensor, clients: Tensor, ledger: Ledger) -> None:
        """Measure one real server step (on a copy) on activations (n, B, ...) of ``clients``: FLOPs, memory."""
        probe = copy.deepcopy(self.server)
        modules = [probe.encoder, probe.projector, probe.momentum_encoder, probe.momentum_projector, probe.queue]
        with torch.random.fork_rng(devices=[]):
            cost = measure_step(lambda: probe.step(query, key, clients, self.cfg.lr), modules=modules,
                                optimizer=probe.optimizer, images=int(query.shape[0] * query.shape[1]),
                                device=self.ctx.device)
        ledger.record(round=0, client=SERVER_ID, kind=SERVER_STEP_COST, **cost.as_dict())

    def measure_client_step(self, data: ImageData) -> StepCost:
        """One real step of ONE client (copies of client 0's nets): augment, online + momentum forward,
        backward of a gradient shaped like the server's, SGD step, EMA."""
        batch = self.split.client_batch
        images = data.images[torch.arange(batch) % len(data)]
        index = torch.zeros(1, dtype=torch.long)
        holder = nn.Module()
        holder.online = nn.ParameterList(nn.Parameter(t) for t in gather(self.client_online, index).values())
        holder.momentum = nn.ParameterList(nn.Parameter(t, requires_grad=False)
                                           for t in gather(self.client_momentum, index).values())
        names = list(self.client_online)
        online, momentum = dict(zip(names, holder.online)), dict(zip(names, holder.momentum))
        sgd = _StackedSGDView(gather(self.client_sgd, index))

        def step() -> None:
            view1, view2 = self.augment(images.to(self.ctx.device))
            query, _ = self.client_forward(online, momentum, view1.unsqueeze(0), view2.unsqueeze(0))
            grad = torch.randn_like(query)  # stands in for the server's gradient (same shape and bytes)
            self.client_update(query, grad, online, momentum, sgd.buffers(), self.cfg.lr)

        with torch.random.fork_rng(devices=[]):
            return measure_step(step, modules=[holder], optimizer=sgd, images=batch, device=self.ctx.device)

    # -------------------------------------------------------------- engine protocol

    def encoder(self) -> Encoder:
        """The global encoder: the averaged online client-net (layers[:cut]) + the server's layers."""
        return self.server.encoder

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict(),
                "client_online": {k: v.detach() for k, v in self.client_online.items()},
                "client_momentum": dict(self.client_momentum), "client_sgd": dict(self.client_sgd),
                "holds_latest": self.holds_latest}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        for mine, saved in ((self.client_online, state["client_online"]),
                            (self.client_momentum, state["client_momentum"]), (self.client_sgd, state["client_sgd"])):
            if set(mine) != set(saved):
                raise ConfigError("the checkpoint's client-nets do not match this config (another cut or model?)")
            for name, t in mine.items():
                t.copy_(saved[name])
        self.holds_latest.copy_(state["holds_latest"])


class MocoSFLClient:
    """One MocoSFL client on its own device (the Flower engine): its images and the shape of its client-net.

    Its nets (online, momentum, SGD buffers: stacks of this one client) are kept by the caller (a Flower
    node keeps them in ``context.state`` between messages); the maths is this module's
    (:func:`forward_at_cut`, :func:`update_from_gradient`). A round's batches are the client's own
    shuffle of its images, ``client_batch`` of them per step it takes part in; a step's views are MoCo v2
    augmentations seeded by (seed, round, client, step), so that the backward recomputes exactly the
    forward's query (no graph is kept between the two messages).
    """

    def __init__(self, ctx: MethodContext, data: ImageData, client_id: int) -> None:
        cfg = ctx.cfg
        self.ctx, self.cfg, self.client_id = ctx, cfg, client_id
        self.split = effective_split(cfg.split, cfg.clients)
        backbone = build_backbone(ctx)
        check_cut(backbone, cfg.split.cut)
        self.template = to_stacked(nn.Sequential(*backbone.layers[:cfg.split.cut]))
        self.augment = build_augment(ctx)
        self.images = ClientImages.collect(lambda _: data, 1)

    def views(self, round_index: int, step: int, served: int) -> tuple[Tensor, Tensor]:
        """The two views (1, B, C, H, W) of the client's ``served``-th batch of the round (its step ``step``)."""
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, round_index, self.client_id, 0x5F2))
        order = self.images.shuffled_order(generator)
        rows = self.images.batch_rows(order, torch.zeros(1, dtype=torch.long), torch.tensor([served]),
                                      self.split.client_batch)  # (1, B)
        torch.manual_seed(derive_seed(self.cfg.seed, round_index, self.client_id, step, 0x5F1))
        view1, view2 = self.augment(self.images.images[rows.flatten()].to(self.ctx.device))
        return view1.unflatten(0, rows.shape), view2.unflatten(0, rows.shape)

    def forward(self, online: Stack, momentum: Stack, round_index: int, step: int, served: int
                ) -> tuple[Tensor, Tensor]:
        """What goes up: query and key activations (1, B, ...) of the step's batch (no graph kept)."""
        view1, view2 = self.views(round_index, step, served)
        with torch.no_grad():
            return forward_at_cut(self.template, online, momentum, view1, view2)

    def backward(self, online: Stack, momentum: Stack, buffers: Stack, grad: Tensor, round_index: int, step: int,
                 served: int) -> Stack:
        """The server's gradient (1, B, ...) of the step's query: recompute it, back-propagate, SGD, EMA.

        ``momentum`` and ``buffers`` are updated in place; returns the new online weights."""
        view1, view2 = self.views(round_index, step, served)
        online = {name: t.detach().clone().requires_grad_() for name, t in online.items()}
        query, _ = forward_at_cut(self.template, online, momentum, view1, view2)
        update_from_gradient(query, grad, online, momentum, buffers, lr=round_lr(self.cfg, round_index), cfg=self.cfg)
        return {name: t.detach() for name, t in online.items()}


@torch.no_grad()
def _load(module: nn.Module, weights: dict[str, Tensor]) -> None:
    for name, p in module.named_parameters():
        p.copy_(weights[name])
