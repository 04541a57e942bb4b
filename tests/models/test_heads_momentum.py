"""Heads (layouts, batch size 1) and momentum helpers (EMA formula, copies, freezing, schedule)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedssl.errors import ConfigError
from fedssl.models.heads import (
    MLPHead, byol_head, mocov2_projector, mocov3_predictor, mocov3_projector, simclr_projector,
)
from fedssl.models.momentum import (
    activate_requires_grad, copy_weights, cosine_tau, deactivate_requires_grad, ema_update,
)


def layer_types(head: nn.Module) -> list[type]:
    return [type(m) for m in head]


def test_head_layouts() -> None:
    assert layer_types(mocov2_projector(512)) == [nn.Linear, nn.ReLU, nn.Linear]
    v3 = mocov3_projector(192)
    assert layer_types(v3) == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert v3[-1].affine is False and v3[1].affine is True
    assert v3[0].bias is None  # a linear feeding a BatchNorm needs no bias
    assert (v3[0].in_features, v3[0].out_features, v3[-2].out_features) == (192, 512, 256)
    assert layer_types(mocov3_predictor()) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert layer_types(byol_head(64)) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert simclr_projector(64)[-1].out_features == 128
    assert layer_types(MLPHead(4, 8, 2, num_layers=1)) == [nn.Linear]


@pytest.mark.parametrize("norm", ["group", "layer", None])
def test_heads_without_batch_norm_work_at_batch_one(norm: str | None) -> None:
    head = mocov3_projector(32, 16, 8, norm=norm).train()
    x = torch.randn(3, 32)
    out = head(x)
    assert out.shape == (3, 8)
    torch.testing.assert_close(head(x[:1]), out[:1])  # batch-independent


def test_batch_norm_head_normalises_its_output() -> None:
    out = mocov3_projector(16, 32, 8).train()(torch.randn(64, 16) * 5 + 3)
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_head_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="norm"):
        MLPHead(4, 4, 4, norm="instance")
    with pytest.raises(ConfigError, match="last_norm"):
        MLPHead(4, 4, 4, last_norm=True)
    with pytest.raises(ConfigError, match="num_layers"):
        MLPHead(4, 4, 4, num_layers=0)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_update_formula() -> None:
    online, target = tiny_net(), tiny_net()
    online[1].running_mean.fill_(0.7)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    ema_update(target, online, tau=0.9)
    for name, p in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    torch.testing.assert_close(target[1].running_mean, torch.full((2,), 0.7))  # buffers copied
    ema_update(target, online, tau=0.0)
    torch.testing.assert_close(target[0].weight, online[0].weight)


def test_ema_update_tracks_no_grad_and_checks_tau() -> None:
    online, target = tiny_net(), tiny_net()
    ema_update(target, online, 0.5)
    assert all(p.grad_fn is None for p in target.parameters())
    with pytest.raises(ConfigError, match="tau"):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="structure"):
        ema_update(nn.Linear(3, 2), online, 0.5)


def test_copy_weights_copies_params_and_buffers_in_place() -> None:
    source, target = tiny_net(), tiny_net()
    source[1].running_var.fill_(4.0)
    source[1].num_batches_tracked.fill_(7)
    weight_storage = target[0].weight
    copy_weights(target, source)
    assert target[0].weight is weight_storage  # same tensor, new values (optimizers keep working)
    for a, b in zip(target.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    source[0].weight.data.add_(1.0)
    assert not torch.equal(target[0].weight, source[0].weight)  # a copy, not shared


def test_deactivate_and_activate_requires_grad() -> None:
    net = copy.deepcopy(tiny_net())
    deactivate_requires_grad(net)
    assert not any(p.requires_grad for p in net.parameters())
    assert net(torch.randn(4, 3)).requires_grad is False
    activate_requires_grad(net)
    assert all(p.requires_grad for p in net.parameters())


def test_cosine_tau_schedule() -> None:
    assert cosine_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_tau(25, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_tau(500, 100, 0.99) == pytest.approx(1.0)  # clamped past the end
    taus = [cosine_tau(s, 10, 0.9) for s in range(11)]
    assert taus == sorted(taus)
    with pytest.raises(ConfigError, match="total"):
        cosine_tau(0, 0, 0.99)
