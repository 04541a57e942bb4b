"""MocoSFL: split + concatenation == unsplit, batched == per-client loop == a plain per-client reference, sync,
queues, runs and resume after a real kill."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedssl.config import SplitConfig
from fedssl.data.datasets import load_split
from fedssl.data.partition import partition
from fedssl.errors import ConfigError
import fedssl.engines.steps as split_steps
from fedssl.engines.local import SilentObserver, start_run
from fedssl.engines.steps import LocalSplitExchange, split_round, step_clients, sync_clients
from fedssl.losses import info_nce, symmetric_info_nce
from fedssl.methods.base import MethodContext
from fedssl.methods.mocosfl import MocoSFL, banked_info_nce, effective_split
from fedssl.methods.mocosfl_client import MocoSFLClients, forward_at_cut
from fedssl.methods.split import StepTask
from fedssl.models.resnet import ResNet
from fedssl.models.ssl import MoCoV2, NegativeQueue
from fedssl.models.stacked import (batched_forward, broadcast_, clone_stack, gather, scatter_, stack_mean,
                                   stack_module, stacked_ema_, stacked_sgd_step_, to_stacked, zeros_like_stack)
from fedssl.resources import DOWNLOAD, UPLOAD, Ledger
from tests.helpers import assert_resume_is_exact, tiny_config


def sfl_config(*overrides: str):
    return tiny_config("method=mocosfl", "ssl.temperature=0.1", "split.sync_every=2", "split.client_batch=2",
                       *overrides)


def build(cfg, image_size: int = 16) -> tuple[MocoSFL, list]:
    """A MocoSFL on tiny synthetic images, and each client's data."""
    data = load_split("synthetic", "train", image_size=image_size, synthetic_size=max(64, 4 * cfg.clients))
    parts = partition(data.labels.numpy(), cfg.clients, "iid", seed=0)
    method = MocoSFL(MethodContext(cfg, data.info, torch.device("cpu")))
    return method, [data.subset(p) for p in parts]


def train_round(method: MocoSFL, round_index: int, client_data, ledger: Ledger) -> dict:
    """One round of the clients simulated in this process (the in-process engine's exchange)."""
    exchange = LocalSplitExchange(method.clients, client_data)
    return split_round(method, method.cfg, round_index, exchange, ledger, SilentObserver())


def _double(method: MocoSFL) -> None:
    """float64 everywhere, for exact comparisons."""
    server = method.server
    for module in (server.encoder, server.projector, server.momentum_encoder, server.momentum_projector, server.queue):
        module.double()
    clients = method.clients
    for stack in (clients.online, clients.momentum, clients.sgd):
        for name in stack:
            stack[name] = stack[name].detach().double().requires_grad_(stack is clients.online)


# ------------------------------------------------------------------ stacked weights


def test_batched_forward_and_grads_equal_each_client_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*ResNet(width=4, blocks_per_stage=(1, 1)).double().layers[:3])  # stem, block, strided block
    stack = stack_module(net, 3)
    for t in stack.values():
        t.add_(0.1 * torch.randn_like(t)).requires_grad_()
    x = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    out = batched_forward(to_stacked(net), stack, x)  # (3, 2, 8, 4, 4)
    grad = torch.randn_like(out)
    out.backward(grad)
    for i in range(3):
        params = {k: v[i].detach().clone().requires_grad_() for k, v in stack.items()}
        xi = x[i].detach().clone().requires_grad_()
        alone = functional_call(net, params, (xi,))
        alone.backward(grad[i])
        torch.testing.assert_close(out[i], alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad[i], xi.grad, rtol=1e-10, atol=1e-12)
        for k in params:
            torch.testing.assert_close(stack[k].grad[i], params[k].grad, rtol=1e-10, atol=1e-12)


def test_stacked_sgd_equals_torch_sgd_and_ema_mean_broadcast() -> None:
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 5)}
    buffers = zeros_like_stack(params)
    reference = [nn.Parameter(params["w"][2].clone()), nn.Parameter(params["b"][2].clone())]
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        grads = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 5)}
        stacked_sgd_step_(params, grads, buffers, lr=0.1, momentum=0.9, weight_decay=5e-4)
        reference[0].grad, reference[1].grad = grads["w"][2].clone(), grads["b"][2].clone()
        sgd.step()
    torch.testing.assert_close(params["w"][2], reference[0].detach())
    torch.testing.assert_close(params["b"][2], reference[1].detach())

    target = {k: torch.zeros_like(v) for k, v in params.items()}
    stacked_ema_(target, params, 0.75)
    torch.testing.assert_close(target["w"], 0.25 * params["w"])
    index = torch.tensor([1, 3])
    mean = stack_mean(params, index)
    torch.testing.assert_close(mean["b"], params["b"][index].mean(0))
    broadcast_(params, mean)
    assert torch.equal(params["b"], mean["b"].expand(4, 5))
    part = gather(params, index)
    part["w"].add_(1.0)
    scatter_(params, index, part)
    assert torch.equal(params["w"][1], mean["w"] + 1) and torch.equal(params["w"][0], mean["w"])


def test_stacked_template_rejects_batchnorm() -> None:
    with pytest.raises(ConfigError, match="group"):
        stack_module(ResNet(width=4, blocks_per_stage=(1,), norm="batch").layers[0], 2)


# ------------------------------------------------------------------ split == unsplit


def test_split_and_concatenation_give_the_unsplit_gradients() -> None:
    """Two server steps (empty queue: in-batch negatives; then queue-only) against one unsplit network."""
    cfg = sfl_config("clients=3", "split.cut=2", "ssl.queue_size=8")
    method, _ = build(cfg)
    _double(method)
    server = method.server
    unsplit = copy.deepcopy({"enc": server.encoder, "proj": server.projector, "menc": server.momentum_encoder,
                             "mproj": server.momentum_projector})
    queue = NegativeQueue(8, cfg.ssl.proj_dim).double()
    clients = torch.arange(3)
    torch.manual_seed(1)
    for step in range(2):
        view1, view2 = (torch.randn(3, 2, 3, 16, 16, dtype=torch.float64) for _ in range(2))
        online = method.clients.online
        query, key = forward_at_cut(method.clients.template, online, method.clients.momentum, view1, view2)
        result = method.server_step({"query": query, "key": key}, clients, lr=0.0)  # lr 0: the weights stay
        query.backward(result.gradient["query"])
        # the same maths on one network and the concatenated batch
        enc, proj, menc, mproj = unsplit["enc"], unsplit["proj"], unsplit["menc"], unsplit["mproj"]
        enc.zero_grad(), proj.zero_grad()
        x1, x2 = view1.flatten(0, 1), view2.flatten(0, 1)
        h_q = enc.forward_to(x1, 2)
        with torch.no_grad():
            h_k = menc.forward_to(x2, 2)
        zq = F.normalize(proj(enc.forward_from(h_q, 2)), dim=1)
        zk = F.normalize(proj(enc.forward_from(h_k, 2)), dim=1)
        with torch.no_grad():
            mk = F.normalize(mproj(menc.forward_from(h_k, 2)), dim=1)
            mq = F.normalize(mproj(menc.forward_from(h_q, 2)), dim=1)
        negatives = queue.negatives() if step else None
        loss = symmetric_info_nce(zq, mk, zk, mq, negatives, temperature=0.1, in_batch_negatives=step == 0)
        loss.backward()
        queue.enqueue(torch.cat([mk, mq]))
        assert result.loss == pytest.approx(loss.item(), rel=1e-12)
        for mine, theirs in zip(server.parameters(), [*enc.layers[2:].parameters(), *proj.parameters()]):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
        client_layers = nn.Sequential(*enc.layers[:2])
        for name, p in client_layers.named_parameters():  # identical client-nets: the sum of their grads
            torch.testing.assert_close(online[name].grad.sum(0), p.grad, rtol=1e-9, atol=1e-12)
            online[name].grad = None
    torch.testing.assert_close(server.queue.negatives().double(), queue.negatives())


# ------------------------------------------------------------------ batched == loop


@pytest.mark.parametrize("queue", ["shared", "per_client"])
def test_batched_clients_equal_the_per_client_loop(queue: str) -> None:
    cfg = sfl_config("clients=6", "split.clients_per_step=0.5", f"split.queue={queue}", "ssl.queue_size=48")
    batched, data = build(cfg)
    loop, _ = build(sfl_config("clients=6", "split.clients_per_step=0.5", f"split.queue={queue}",
                               "ssl.queue_size=48", "split.simulate=loop"))
    rows = []
    for method in (batched, loop):
        ledger = Ledger(rows=[])
        rows.append([train_round(method, r, data.__getitem__, ledger) for r in range(2)])
        assert {r["kind"] for r in ledger.rows} >= {UPLOAD, DOWNLOAD, "server_step_cost"}
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["bytes_up"] == b["bytes_up"]
    for stack in ("online", "momentum", "sgd"):
        for name, t in getattr(batched.clients, stack).items():
            torch.testing.assert_close(t, getattr(loop.clients, stack)[name], rtol=1e-4, atol=1e-6)
    for p, q in zip(batched.server.parameters(), loop.server.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ sync


@pytest.mark.parametrize("sync_momentum", [True, False])
def test_sync_averages_online_and_momentum_nets(sync_momentum: bool) -> None:
    method, data = build(sfl_config("clients=4", f"split.sync_momentum={str(sync_momentum).lower()}"))
    clients = method.clients
    torch.manual_seed(0)
    for stack in (clients.online, clients.momentum):
        for t in stack.values():
            t.detach().add_(torch.randn_like(t))
    before = {k: v.clone() for k, v in clients.momentum.items()}
    online_mean = stack_mean(clients.online, torch.tensor([0, 2]))
    momentum_mean = stack_mean(clients.momentum, torch.tensor([0, 2]))
    synced = torch.tensor([0, 2])
    sync_clients(method, 0, LocalSplitExchange(clients, data.__getitem__), synced)
    for name, t in clients.online.items():  # the average goes down to the clients whose nets went into it
        t = t[synced]
        assert torch.allclose(t, online_mean[name].expand_as(t))
    for name, p in nn.Sequential(*method.encoder().layers[:1]).named_parameters():
        assert torch.allclose(p, online_mean[name])  # the global encoder holds the averaged client-net
    for name, t in clients.momentum.items():
        t = t[synced]
        expected = momentum_mean[name].expand_as(t) if sync_momentum else before[name][synced]
        assert torch.allclose(t, expected)
    assert method.holds_latest.tolist() == [True, False, True, False]


# ------------------------------------------------------------------ queues


def test_negative_queue_is_fifo_and_banks_are_independent() -> None:
    queue = NegativeQueue(4, 2)
    keys = torch.arange(12.0).view(6, 2)
    queue.enqueue(keys[:3])
    assert queue.negatives().tolist() == keys[:3].tolist()
    queue.enqueue(keys[3:5])  # wraps: the oldest (key 0) is overwritten
    assert sorted(queue.negatives()[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0]
    queue.enqueue(torch.arange(100.0, 112.0).view(6, 2))  # more than fits: the newest 4 stay
    assert sorted(queue.negatives()[:, 0].tolist()) == [104.0, 106.0, 108.0, 110.0]

    banks = NegativeQueue(3, 2, banks=3)
    banks.enqueue(torch.ones(2, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1), torch.tensor([0, 2]))
    negatives, valid = banks.banked_negatives(torch.tensor([0, 1, 2]))
    assert valid.sum(1).tolist() == [2, 0, 2]
    assert negatives[0, :2].eq(1).all() and negatives[2, :2].eq(2).all()


def test_mocov2_state_dict_of_the_old_queue_layout_still_loads() -> None:
    from fedssl.config import SSLConfig

    ssl_cfg = SSLConfig(queue_size=5, proj_dim=4, proj_hidden=8)
    model = MoCoV2(ResNet(width=4, blocks_per_stage=(1,)), ssl_cfg)
    model.enqueue(torch.randn(3, 4))
    model.enqueue(torch.randn(4, 4))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("queue.")}
    state.update(queue=model.queue.keys[0], queue_len=model.queue.length[0], queue_ptr=model.queue.ptr[0])
    again = MoCoV2(ResNet(width=4, blocks_per_stage=(1,)), ssl_cfg)
    again.load_state_dict(state)
    assert torch.equal(again.queue.negatives(), model.queue.negatives()) and int(again.queue.ptr) == 2


def test_per_client_queues_hold_each_clients_own_keys_and_the_loss_matches() -> None:
    method, data = build(sfl_config("clients=3", "split.queue=per_client", "ssl.queue_size=30"))
    train_round(method, 1, data.__getitem__, Ledger(rows=[]))  # round 1: no server-cost measurement
    queue = method.server.queue
    assert queue.keys.shape[:2] == (3, 10) and queue.length.tolist() == [8, 8, 8]  # 2 steps x 2 key sets x 2
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    negatives, valid = queue.banked_negatives(torch.arange(3))
    expected = sum(info_nce(q[i], k[i], queue.negatives(i), temperature=0.1, in_batch_negatives=False)
                   for i in range(3)) / 3
    got = banked_info_nce(q, k, negatives, valid, temperature=0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ settings


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="model.norm"):
        sfl_config("model.norm=batch")
    with pytest.raises(ConfigError, match="split.cut"):
        sfl_config("split.cut=5")  # a 4-block ResNet has 5 layers: the server would hold none
    assert effective_split(sfl_config().split, 1000) == sfl_config().split  # auto_adjust off: as configured
    auto = sfl_config("split.auto_adjust=true").split
    assert (effective_split(auto, 10).client_batch, effective_split(auto, 10).clients_per_step) == (10, 1.0)
    big = effective_split(auto, 1000)
    assert (big.client_batch, big.clients_per_step) == (1, 0.1)
    assert big.sync_every == auto.sync_every == 2  # the config's: a tiny run of an auto-adjusted preset stays tiny
    assert effective_split(SplitConfig(auto_adjust=True), 1000).sync_every == 50  # the default: the reference's


def test_step_sampling_is_seeded_and_never_favours_client_zero() -> None:
    method, _ = build(sfl_config("clients=100", "split.clients_per_step=0.1"))
    draws = [step_clients(method.split, method.num_clients, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(len(d) == 10 and len(set(d.tolist())) == 10 for d in draws)
    assert sum(0 in d.tolist() for d in draws) < 15  # ~5 expected; the reference bug would give 50
    assert torch.equal(draws[3], step_clients(method.split, method.num_clients, torch.Generator().manual_seed(3)))


def test_a_thousand_clients_of_one_image_train_one_round() -> None:
    cfg = sfl_config("clients=1000", "split.client_batch=1", "image_size=16", "partition=shards")
    data = load_split("synthetic", "train", image_size=16, synthetic_size=2000)
    parts = partition(data.labels.numpy(), 1000, "shards", seed=0)
    method = MocoSFL(MethodContext(cfg, data.info, torch.device("cpu")))
    ledger = Ledger(rows=[])
    row = train_round(method, 1, lambda i: data.subset(parts[i]), ledger)  # round 1: no server-cost probe
    assert row["clients"] == 1000 and row["images"] == 2000 and np.isfinite(row["loss"])
    uploads = [r for r in ledger.rows if r["kind"] == UPLOAD]
    assert len(uploads) == 1000 and len({r["client"] for r in uploads}) == 1000
    # per client and round: 2 steps of (query + key) activations of one 8x16x16 float image, and its weights
    assert uploads[0]["activation_bytes"] == 2 * 2 * 8 * 16 * 16 * 4
    assert uploads[0]["weight_bytes"] == 2 * 4 * (3 * 8 * 9 + 2 * 8)  # online + momentum stem


# ------------------------------------------------------------------ engine runs


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """A real `fedssl run` killed by SIGKILL after its first checkpoint and resumed: the client stacks, SGD
    buffers, server, queue and who-holds-the-latest-net come back, so the run ends exactly like an uninterrupted one."""
    cfg = sfl_config("rounds=3", "clients=4", "split.clients_per_step=0.5", "eval.every=0", "threads=2")
    assert_resume_is_exact(cfg, tmp_path)
    report = (tmp_path / "killed" / "report.md").read_text()
    assert "server FLOPs per image" in report


@pytest.mark.slow
def test_real_cifar10_subset_loss_falls(tmp_path: Path, cifar_subset_dir: Path) -> None:
    """20 non-IID clients x 5 images per step; the loss falls once the queue is full (round 2 on)."""
    cfg = sfl_config("dataset=cifar10", f"data_dir={cifar_subset_dir}", "clients=20", "partition=shards",
                     "split.client_batch=5", "split.sync_every=10", "rounds=5", "ssl.queue_size=256",
                     "lr_schedule=constant", "eval.every=0", "eval.probe=false")
    out = start_run(cfg, tmp_path / "cifar")
    losses = [m["loss"] for m in out.metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[1] - 0.1, losses
    assert out.final["knn_acc"] > out.initial["knn_acc"]


# ------------------------------------------------------------------ batched == an independent plain reference


def _nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor | None, t: float) -> torch.Tensor:
    """MoCo InfoNCE written out: queue-only negatives, or the batch's other keys while the queue is empty."""
    if negatives is None:
        return F.cross_entropy(q @ k.T / t, torch.arange(len(q)))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


@torch.no_grad()
def _ema(target: nn.Module, online: nn.Module, tau: float) -> None:
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o, alpha=1 - tau)


@torch.no_grad()
def _average_into(nets: list[nn.Module], participants: list[int]) -> None:
    """Every net <- the mean of the participants' nets."""
    for params in zip(*(net.parameters() for net in nets), strict=True):
        mean = torch.stack([params[c] for c in participants]).mean(0)
        for p in params:
            p.copy_(mean)


class PlainMocoSFL:
    """MocoSFL written plainly: per client an nn.Module copy of ``encoder.layers[:cut]`` (online and momentum) with
    its own torch.optim.SGD; the server's modules with theirs; one FIFO queue (a tensor, oldest key first). The
    client nets and the server run as ONE graph, so the gradient reaches the clients by ordinary backward."""

    def __init__(self, method: MocoSFL) -> None:
        cfg, server = method.cfg, method.server
        self.cfg, self.cut = cfg, method.cut
        client = nn.Sequential(*server.encoder.layers[:self.cut])
        self.online = [copy.deepcopy(client) for _ in range(cfg.clients)]
        self.momentum = [copy.deepcopy(client) for _ in range(cfg.clients)]
        self.encoder, self.projector = copy.deepcopy(server.encoder), copy.deepcopy(server.projector)
        self.momentum_encoder = copy.deepcopy(server.momentum_encoder)
        self.momentum_projector = copy.deepcopy(server.momentum_projector)

        def sgd(module: nn.Module) -> torch.optim.SGD:
            return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum,
                                   weight_decay=cfg.weight_decay)

        self.client_sgd = [sgd(net) for net in self.online]
        self.server_sgd = sgd(self.server_part(self.encoder, self.projector))
        self.queue = torch.zeros(0, cfg.ssl.proj_dim, dtype=torch.float64)

    def server_part(self, encoder: nn.Module, projector: nn.Module) -> nn.ModuleList:
        return nn.ModuleList([*encoder.layers[self.cut:], encoder.norm, projector])

    def step(self, view1: torch.Tensor, view2: torch.Tensor, active: list[int], lr: float) -> float:
        """One step; views (n*B, C, H, W), client-major over the ``active`` clients."""
        batch, t, tau = len(view1) // len(active), self.cfg.ssl.temperature, self.cfg.ssl.momentum
        for opt in (self.server_sgd, *self.client_sgd):
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr
        mine = [slice(j * batch, (j + 1) * batch) for j in range(len(active))]
        query = torch.cat([self.online[c](view1[s]) for c, s in zip(active, mine)])
        with torch.no_grad():
            key = torch.cat([self.momentum[c](view2[s]) for c, s in zip(active, mine)])
        n = len(query)
        z = F.normalize(self.projector(self.encoder.forward_from(torch.cat([query, key]), self.cut)), dim=1)
        with torch.no_grad():
            m = F.normalize(self.momentum_projector(self.momentum_encoder.forward_from(
                torch.cat([key, query]), self.cut)), dim=1)
        negatives = self.queue if len(self.queue) else None
        loss = 0.5 * (_nce(z[:n], m[:n], negatives, t) + _nce(z[n:], m[n:], negatives, t))
        loss.backward()
        self.server_sgd.step()
        _ema(self.server_part(self.momentum_encoder, self.momentum_projector),
             self.server_part(self.encoder, self.projector), tau)
        for c in active:
            self.client_sgd[c].step()
            _ema(self.momentum[c], self.online[c], tau)
        self.queue = torch.cat([self.queue, m[:n], m[n:]])[-self.cfg.ssl.queue_size:]
        return loss.item()

    def sync(self, participants: list[int]) -> None:
        _average_into(self.online, participants)
        if self.cfg.split.sync_momentum:
            _average_into(self.momentum, participants)


class RecordedViews:
    """The clients' own views of a step, kept (in float64, flattened client-major to (n*B, C, H, W)) so that the
    reference sees the same inputs."""

    def __init__(self, views: Callable[[StepTask], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.make, self.views = views, []

    def __call__(self, task: StepTask) -> tuple[torch.Tensor, torch.Tensor]:
        views = tuple(v.double() for v in self.make(task))
        self.views.append(tuple(v.flatten(0, 1) for v in views))
        return views  # type: ignore[return-value]


TOL = dict(rtol=1e-8, atol=1e-10)  # float64 on both sides


def _assert_close_pairs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs.detach(), **TOL)


def _stack_and_nets(stack: dict[str, torch.Tensor], nets: list[nn.Module]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(client c's row of the stack, client c's parameter) for every client and parameter."""
    return ((stack[name][c], p) for c, net in enumerate(nets) for name, p in net.named_parameters())


def _stack_and_buffers(stack: dict[str, torch.Tensor], nets: list[nn.Module], optimizers: list[torch.optim.SGD]
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(client c's row of the stacked SGD buffers, torch.optim.SGD's momentum buffer of client c's parameter)."""
    return ((stack[name][c], optimizers[c].state[p]["momentum_buffer"])
            for c, net in enumerate(nets) for name, p in net.named_parameters())


def _modules_pairs(a: nn.Module, b: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return zip(a.parameters(), b.parameters(), strict=True)


def _in_time_order(queue: NegativeQueue) -> torch.Tensor:
    """A ring buffer's keys, oldest first."""
    held, keys = int(queue.length[0]), queue.keys[0]
    return keys[:held] if held < queue.size else keys.roll(-int(queue.ptr[0]), 0)


class FixedSchedule:
    """Stands in for ``engines.steps.step_clients``: step s's active clients are ``steps[s]`` (None = all)."""

    def __init__(self, steps: list[list[int] | None], clients: int) -> None:
        self.steps, self.clients, self.taken = steps, clients, 0

    def __call__(self, split: SplitConfig, num_clients: int, generator: torch.Generator) -> torch.Tensor:
        active = self.active(self.taken)
        self.taken += 1
        return torch.tensor(active)

    def active(self, step: int) -> list[int]:
        return self.steps[step] or list(range(self.clients))


class SyncSpy:
    """Wraps the clients' ``upload`` (called by the sync only): keeps the client stacks as they were just before."""

    def __init__(self, clients: MocoSFLClients) -> None:
        self.clients, self.upload, self.before = clients, clients.upload, []

    def __call__(self, participants: torch.Tensor) -> dict[str, torch.Tensor]:
        self.before.append((clone_stack(self.clients.online), clone_stack(self.clients.momentum)))
        return self.upload(participants)


def _distinct_clients(method: MocoSFL, reference: PlainMocoSFL) -> None:
    """Move each client's online and momentum net its own way, in the method's stacks and the reference alike."""
    torch.manual_seed(3)
    with torch.no_grad():
        for stack, nets in ((method.clients.online, reference.online), (method.clients.momentum, reference.momentum)):
            for t in stack.values():
                t.add_(0.1 * torch.randn_like(t))
            for c, net in enumerate(nets):
                for name, p in net.named_parameters():
                    p.copy_(stack[name][c])


@pytest.mark.parametrize("sync_momentum", [True, False])
def test_batched_simulation_equals_a_plain_per_client_reference(sync_momentum: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """3 distinct clients (cut 2), steps with all / some / one client active, a shared queue that wraps,
    2 rounds of 3 steps with a sync after each: the stacked, batched MocoSFL gives the losses, client nets
    (just before and after each sync), SGD buffers, server and momentum weights and queue of plain per-client
    modules with torch.optim.SGD (:class:`PlainMocoSFL`), in float64."""
    cfg = sfl_config("clients=3", "split.cut=2", "split.sync_every=3", "ssl.queue_size=16", "lr=0.05",
                     "lr_schedule=constant", f"split.sync_momentum={str(sync_momentum).lower()}")
    method, data = build(cfg)
    _double(method)
    reference = PlainMocoSFL(method)
    _distinct_clients(method, reference)
    schedule = FixedSchedule([None, [0, 2], [1], [1, 2], None, [2]], clients=3)
    monkeypatch.setattr(split_steps, "step_clients", schedule)
    clients = method.clients
    clients.views = recorded = RecordedViews(clients.views)  # type: ignore[method-assign]
    clients.upload = spy = SyncSpy(clients)  # type: ignore[method-assign]
    for round_index in (1, 2):  # round 0 would also measure a server step (on a copy)
        row = train_round(method, round_index, data.__getitem__, Ledger(rows=[]))
        steps = range((round_index - 1) * 3, round_index * 3)
        losses = [reference.step(*recorded.views[s], schedule.active(s), cfg.lr) for s in steps]
        assert row["loss"] == pytest.approx(sum(losses) / 3, rel=1e-10)
        online, momentum = spy.before[-1]
        _assert_close_pairs(_stack_and_nets(online, reference.online))
        _assert_close_pairs(_stack_and_nets(momentum, reference.momentum))
        reference.sync(sorted({c for s in steps for c in schedule.active(s)}))
        _assert_close_pairs(_stack_and_nets(clients.online, reference.online))
        _assert_close_pairs(_stack_and_nets(clients.momentum, reference.momentum))
        _assert_close_pairs(_stack_and_buffers(clients.sgd, reference.online, reference.client_sgd))
    assert not torch.equal(spy.before[0][0]["0.0.weight"][0], spy.before[0][0]["0.0.weight"][1])  # they differed
    server = method.server
    _assert_close_pairs(_modules_pairs(reference.server_part(server.encoder, server.projector),
                                       reference.server_part(reference.encoder, reference.projector)))
    _assert_close_pairs(_modules_pairs(
        reference.server_part(server.momentum_encoder, server.momentum_projector),
        reference.server_part(reference.momentum_encoder, reference.momentum_projector)))
    # the global encoder's client part is the averaged online client-net (and the momentum one, if synced)
    _assert_close_pairs(_modules_pairs(nn.Sequential(*server.encoder.layers[:2]), reference.online[0]))
    if sync_momentum:
        _assert_close_pairs(_modules_pairs(nn.Sequential(*server.momentum_encoder.layers[:2]), reference.momentum[0]))
    torch.testing.assert_close(_in_time_order(server.queue).double(), reference.queue, **TOL)
