"""MocoSFL's client role: what a device holds (its images, online and momentum client-nets, SGD buffers) and does.

:class:`MocoSFLClients` holds the clients of ONE machine as stacks ``(C, ...)`` (``fedssl.models.stacked``):
a Flower node holds one, the in-process engine every client, and runs all clients of a step in one call
(``split.simulate = "loop"``: the same functions one client after another, the speed benchmark's baseline).

Per step a client takes its next ``client_batch`` images of its own shuffle of the round (seeded by
(seed, round, client)), makes two MoCo v2 views of them, and sends up the query activations
``online(x1)`` (the graph stays on the client) and the key activations ``momentum(x2)``; the server's
gradient comes back, the client back-propagates it, steps its SGD and the EMA of its momentum net.

The views are rows of ONE virtual batch per step: the augmentation parameters are drawn, seeded by
(seed, round, step), for ``client_batch`` images of every client, and each client applies its own rows
(:func:`virtual_batch_views`). So a client's views do not depend on which other clients are active or
on how many of them one call augments: a device alone and the in-process engine's single batched call
give the same images, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from fedssl.config import RunConfig, SplitConfig
from fedssl.data.augment import TwoViewAugment, to_float
from fedssl.data.datasets import ImageData
from fedssl.errors import ConfigError
from fedssl.methods.base import MethodContext, Payload, build_augment, build_backbone
from fedssl.methods.split import SplitClients, Stacked, StepTask
from fedssl.models.encoder import Encoder
from fedssl.models.stacked import (Stack, batched_forward, gather, scatter_, stack_module, stacked_ema_,
                                   stacked_sgd_step_, to_stacked, zeros_like_stack)
from fedssl.resources import StepCost, measure_step
from fedssl.training import derive_seed, round_lr

AUTO_SERVER_BATCH = 100  # auto_adjust: images per server step the reference scripts aim at
ONLINE, MOMENTUM = "online", "momentum"  # payload key prefixes of the client-nets: "online/<parameter>"
VIEW_SEED, SHUFFLE_SEED = 0x5F1, 0x5F2
BATCH_WIDE_PARAMS = ("order", "forward_input_shape")  # kornia parameters shared by a whole batch


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


def nets_payload(online: dict[str, Tensor], momentum: dict[str, Tensor] | None) -> Payload:
    """Client-nets as one payload: ``online/<name>`` (and ``momentum/<name>``)."""
    out = {f"{ONLINE}/{k}": v for k, v in online.items()}
    if momentum is not None:
        out.update({f"{MOMENTUM}/{k}": v for k, v in momentum.items()})
    return out


def part(payload: Payload, prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix/`` of a client-nets payload, without the prefix ({} if none)."""
    start = prefix + "/"
    return {k[len(start):]: v for k, v in payload.items() if k.startswith(start)}


# ------------------------------------------------------------------ the clients' data


@dataclass(frozen=True)
class ClientImages:
    """The images of the clients one machine holds in one client-major tensor: a step's batches are one index."""

    images: Tensor  # (M, C, H, W) uint8: the first client's images, then the second's, ...
    offsets: Tensor  # (C,) first row of each client
    sizes: Tensor  # (C,) images per client

    @classmethod
    def collect(cls, client_data: Callable[[int], ImageData], ids: Sequence[int]) -> ClientImages:
        parts = [client_data(i).images for i in ids]
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        if int(sizes.min()) < 1:
            raise ConfigError("a client holds no images; use fewer clients or another partition")
        return cls(torch.cat(parts), torch.cumsum(sizes, 0) - sizes, sizes)

    def shuffled_order(self, ids: Sequence[int], seed: int, round_index: int) -> Tensor:
        """(M,) rows, each client's range shuffled within itself by its own generator (seed, round, client)."""
        order = torch.empty(len(self.images), dtype=torch.long)
        for row, client in enumerate(ids):
            generator = torch.Generator().manual_seed(derive_seed(seed, round_index, client, SHUFFLE_SEED))
            start, size = int(self.offsets[row]), int(self.sizes[row])
            order[start:start + size] = start + torch.randperm(size, generator=generator)
        return order

    def batch_rows(self, order: Tensor, rows: Tensor, served: Tensor, batch: int) -> Tensor:
        """(n, B) image rows for the clients at ``rows`` (n,): each takes its next ``batch`` images in ``order``.

        ``served`` (n,) counts the batches each client already took this round; a client cycles through its images.
        """
        position = (served.unsqueeze(1) * batch + torch.arange(batch)) % self.sizes[rows].unsqueeze(1)
        return order[self.offsets[rows].unsqueeze(1) + position]


def _rows_of(params: dict[str, Any], rows: Tensor, virtual: int) -> dict[str, Any]:
    """kornia parameters drawn for a virtual batch of ``virtual`` images, cut down to the images at ``rows``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "forward_input_shape":
            out[key] = torch.tensor([len(rows), *value[1:].tolist()], dtype=value.dtype)
        elif key in BATCH_WIDE_PARAMS or not torch.is_tensor(value):
            out[key] = value
        elif value.shape[:1] == (virtual,):
            out[key] = value[rows]
        else:
            raise ConfigError(f"unexpected kornia parameter {key!r} of shape {tuple(value.shape)}; fedssl supports "
                              "kornia 0.8-0.9 (pip install 'kornia>=0.8,<0.10')")
    return out


@torch.no_grad()
def virtual_batch_views(augment: TwoViewAugment, images: Tensor, positions: Tensor, virtual: int
                        ) -> tuple[Tensor, Tensor]:
    """Two views of ``images`` (n, C, H, W) as rows ``positions`` (n,) of a virtual batch of ``virtual`` images.

    Every random parameter is drawn (from the global RNG, seeded by the caller) for the whole virtual batch
    and each image gets its own row's, so the views of an image depend only on the seed and its position.
    """
    x = to_float(images)
    views = []
    for ops in augment.views:
        h = x
        for op in ops:
            params = op.forward_parameters(torch.Size((virtual, *h.shape[1:])))
            h = op(h, params=_rows_of(params, positions, virtual))
        views.append(augment.normalize(h))
    return views[0], views[1]


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


@dataclass
class _Pending:
    """A forward whose backward is awaited: the stacks it ran on and its query activations (graph kept)."""

    round: int
    step: int
    clients: Tensor
    parts: list[tuple[Tensor | None, Stack, Stack, Tensor]]  # (rows or None = all, online, momentum, query)


class MocoSFLClients(SplitClients):
    """The MocoSFL clients ``ids`` of one machine: stacks (C, ...) of their online / momentum nets and SGD buffers.

    Every client starts with the seeded initial client-net (the server's first ``cut`` layers, built from the
    same seed). What the clients of a forward computed is kept until its backward (no recomputation); a
    backward without its forward (a Flower node: each message in a fresh process) recomputes the same query
    from the same seeded views.
    """

    def __init__(self, ctx: MethodContext, ids: Sequence[int]) -> None:
        cfg = ctx.cfg
        self.ctx, self.cfg = ctx, cfg
        self.split = effective_split(cfg.split, cfg.clients)
        self.ids = [int(i) for i in ids]
        self._row = {client: row for row, client in enumerate(self.ids)}
        self._identity = self.ids == list(range(len(self.ids)))  # row = client id (the in-process engine)
        torch.manual_seed(cfg.seed)  # the server's global encoder is built from the same seed
        backbone = build_backbone(ctx).to(ctx.device)
        check_cut(backbone, cfg.split.cut)
        net = nn.Sequential(*backbone.layers[:cfg.split.cut])
        self.template = to_stacked(net)
        self.online = {k: v.requires_grad_() for k, v in stack_module(net, len(self.ids)).items()}
        self.momentum = stack_module(net, len(self.ids))
        self.sgd = zeros_like_stack(self.online)  # per-client SGD momentum buffers, never averaged
        self.augment = build_augment(ctx)
        self.one_at_a_time = self.split.simulate == "loop"
        self.images: ClientImages | None = None
        self._source: Any = None
        self._order: tuple[int, Tensor] | None = None  # (round, its shuffled order)
        self._pending: _Pending | None = None

    # -------------------------------------------------------------- data and rows

    def use_data(self, client_data: Callable[[int], ImageData]) -> None:
        source = getattr(client_data, "__self__", client_data)
        if self.images is None or self._source is not source:
            self.images, self._source, self._order = ClientImages.collect(client_data, self.ids), source, None

    def _rows(self, clients: Tensor) -> Tensor | None:
        """The stack rows of ``clients`` (n,); None = every row, in order (no copy)."""
        if len(clients) == len(self.ids) and (self._identity or clients.tolist() == self.ids):
            return None
        if self._identity:
            return clients
        try:
            return torch.tensor([self._row[int(c)] for c in clients], dtype=torch.long)
        except KeyError as err:
            raise ConfigError(f"client {err.args[0]} is not held here (this machine holds {self.ids[:5]} ...)") from None

    def _order_of(self, round_index: int) -> Tensor:
        if self._order is None or self._order[0] != round_index:
            assert self.images is not None, "use_data first"
            self._order = (round_index, self.images.shuffled_order(self.ids, self.cfg.seed, round_index))
        return self._order[1]

    def views(self, task: StepTask) -> tuple[Tensor, Tensor]:
        """The two views (n, B, C, H, W) of the task's clients' next batches."""
        assert self.images is not None, "use_data first"
        batch = self.split.client_batch
        rows = self._rows(task.clients)
        rows = torch.arange(len(self.ids)) if rows is None else rows
        image_rows = self.images.batch_rows(self._order_of(task.round), rows, task.served, batch)  # (n, B)
        positions = (task.clients.unsqueeze(1) * batch + torch.arange(batch)).flatten()  # in the virtual batch
        torch.manual_seed(derive_seed(self.cfg.seed, task.round, task.step, VIEW_SEED))  # kornia: the global RNG
        view1, view2 = virtual_batch_views(self.augment, self.images.images[image_rows.flatten()].to(self.ctx.device),
                                           positions, self.cfg.clients * batch)
        return view1.unflatten(0, image_rows.shape), view2.unflatten(0, image_rows.shape)

    # -------------------------------------------------------------- the role

    @torch.no_grad()
    def receive(self, clients: Tensor, nets: Payload) -> None:
        self._pending = None  # new weights: a kept forward graph no longer fits them
        rows = self._rows(clients)
        for stack, prefix in ((self.online, ONLINE), (self.momentum, MOMENTUM)):
            weights = part(nets, prefix)
            for name, t in (stack.items() if weights else ()):
                value = weights[name].to(t.device, t.dtype)
                if rows is None:
                    t.copy_(value.unsqueeze(0).expand_as(t))
                else:
                    t[rows] = value

    def forward(self, task: StepTask) -> Stacked:
        view1, view2 = self.views(task)
        rows = self._rows(task.clients)
        groups: list[tuple[Tensor | None, slice]] = [(rows, slice(None))]
        if self.one_at_a_time:
            every = torch.arange(len(self.ids)) if rows is None else rows
            groups = [(every[j:j + 1], slice(j, j + 1)) for j in range(len(every))]
        parts = []
        for index, span in groups:
            online = gather(self.online, index, requires_grad=True)
            momentum = gather(self.momentum, index)
            query, key = forward_at_cut(self.template, online, momentum, view1[span], view2[span])
            parts.append((index, online, momentum, query, key))
        self._pending = _Pending(task.round, task.step, task.clients, [p[:4] for p in parts])
        return {"query": torch.cat([p[3].detach() for p in parts]), "key": torch.cat([p[4] for p in parts])}

    def backward(self, task: StepTask, gradient: Stacked) -> None:
        pending = self._pending
        self._pending = None
        if (pending is None or (pending.round, pending.step) != (task.round, task.step)
                or not torch.equal(pending.clients, task.clients)):
            self.forward(task)  # recompute the query from the same seeded views (no graph was kept)
            pending, self._pending = self._pending, None
        assert pending is not None
        grad, start = gradient["query"], 0
        lr = round_lr(self.cfg, task.round)
        for index, online, momentum, query in pending.parts:
            n = query.shape[0]
            buffers = gather(self.sgd, index)
            update_from_gradient(query, grad[start:start + n].to(query.device), online, momentum, buffers, lr=lr,
                                 cfg=self.cfg)
            for stack, values in ((self.online, online), (self.momentum, momentum), (self.sgd, buffers)):
                scatter_(stack, index, values)
            start += n

    def upload(self, clients: Tensor) -> Stacked:
        rows = self._rows(clients)
        nets = {f"{ONLINE}/{k}": (t if rows is None else t[rows]).detach().clone() for k, t in self.online.items()}
        if self.split.sync_momentum:
            nets.update({f"{MOMENTUM}/{k}": (t if rows is None else t[rows]).clone() for k, t in self.momentum.items()})
        return nets

    def state_dict(self) -> dict[str, Any]:
        return {"client_online": {k: v.detach() for k, v in self.online.items()},
                "client_momentum": dict(self.momentum), "client_sgd": dict(self.sgd)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        for mine, saved in ((self.online, state["client_online"]), (self.momentum, state["client_momentum"]),
                            (self.sgd, state["client_sgd"])):
            if set(mine) != set(saved):
                raise ConfigError("the checkpoint's client-nets do not match this config (another cut or model?)")
            for name, t in mine.items():
                t.copy_(saved[name])

    # -------------------------------------------------------------- measurement

    def measure_step(self, data: ImageData) -> StepCost:
        """One real step of ONE client (copies of the first client's nets): augment, online + momentum forward,
        backward of a gradient shaped like the server's, SGD step, EMA."""
        batch = self.split.client_batch
        images = data.images[torch.arange(batch) % len(data)]
        index = torch.zeros(1, dtype=torch.long)
        holder = nn.Module()
        holder.online = nn.ParameterList(nn.Parameter(t) for t in gather(self.online, index).values())
        holder.momentum = nn.ParameterList(nn.Parameter(t, requires_grad=False)
                                           for t in gather(self.momentum, index).values())
        names = list(self.online)
        online, momentum = dict(zip(names, holder.online)), dict(zip(names, holder.momentum))
        sgd = _StackedSGDView(gather(self.sgd, index))

        def step() -> None:
            view1, view2 = self.augment(images.to(self.ctx.device))
            query, _ = forward_at_cut(self.template, online, momentum, view1.unsqueeze(0), view2.unsqueeze(0))
            grad = torch.randn_like(query)  # stands in for the server's gradient (same shape and bytes)
            update_from_gradient(query, grad, online, momentum, sgd.buffers(), lr=self.cfg.lr, cfg=self.cfg)

        with torch.random.fork_rng(devices=[]):
            return measure_step(step, modules=[holder], optimizer=sgd, images=batch, device=self.ctx.device)
