"""Each loss against a hand-written reference: explicit Python loops doing the math the slow, obvious way."""

from __future__ import annotations

import math

import pytest
import torch

from fedssl.errors import ConfigError
from fedssl.losses import (
    byol_loss, cosine_distance, info_nce, masked_patch_mse, mse_distance, nt_xent, symmetric_info_nce,
)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def cross_entropy(positive: float, logits: list[float]) -> float:
    """-log(exp(positive) / sum(exp(l) for l in logits)), with ``positive`` one of ``logits``."""
    return -positive + math.log(sum(math.exp(l) for l in logits))


def reference_info_nce(query, key, queue, temperature, in_batch_negatives) -> float:
    n = query.shape[0]
    total = 0.0
    for i in range(n):
        q = unit(query[i])
        positive = dot(q, unit(key[i])) / temperature
        logits = [positive]
        if in_batch_negatives:
            logits += [dot(q, unit(key[j])) / temperature for j in range(n) if j != i]
        if queue is not None:
            logits += [dot(q, queue[j]) / temperature for j in range(queue.shape[0])]
        total += cross_entropy(positive, logits)
    return total / n


def normalised_queue(k: int, d: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(k, d), dim=1)


@pytest.mark.parametrize("n, k, in_batch", [(4, 0, True), (4, 5, True), (4, 5, False), (1, 3, False), (3, 6, True)])
def test_info_nce_matches_loop_reference(n: int, k: int, in_batch: bool) -> None:
    query, key = torch.randn(n, 5) * 3, torch.randn(n, 5)
    queue = normalised_queue(k, 5) if k else None
    expected = reference_info_nce(query, key, queue, 0.2, in_batch)
    got = info_nce(query, key, queue, temperature=0.2, in_batch_negatives=in_batch)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_without_negatives_is_zero_and_empty_queue_is_no_queue() -> None:
    query, key = torch.randn(1, 4), torch.randn(1, 4)
    assert info_nce(query, key).item() == pytest.approx(0.0, abs=1e-7)  # N = 1, in-batch only
    empty = torch.zeros(0, 4)
    assert info_nce(query, key, empty, in_batch_negatives=False).item() == pytest.approx(0.0, abs=1e-7)
    query, key = torch.randn(3, 4), torch.randn(3, 4)
    assert info_nce(query, key, empty).item() == pytest.approx(info_nce(query, key).item())
    queue = normalised_queue(2, 4)
    one = info_nce(query[:1], key[:1], queue).item()
    assert one == pytest.approx(reference_info_nce(query[:1], key[:1], queue, 0.1, True), rel=1e-5) and one > 0


def test_info_nce_gradient_flows_to_query_and_key() -> None:
    query, key = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    info_nce(query, key, normalised_queue(5, 4)).backward()
    assert query.grad.abs().sum() > 0 and key.grad.abs().sum() > 0


def test_symmetric_info_nce_is_mean_of_both_orders() -> None:
    q1, k2, q2, k1 = (torch.randn(3, 4) for _ in range(4))
    queue = normalised_queue(4, 4)
    expected = (reference_info_nce(q1, k2, queue, 0.1, False) + reference_info_nce(q2, k1, queue, 0.1, False)) / 2
    got = symmetric_info_nce(q1, k2, q2, k1, queue, temperature=0.1, in_batch_negatives=False)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        info_nce(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="queue"):
        info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 5))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_nt_xent_matches_loop_reference(n: int) -> None:
    z1, z2 = torch.randn(n, 6), torch.randn(n, 6)
    z = [unit(v) for v in torch.cat([z1, z2])]
    t = 0.5
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        logits = [dot(z[i], z[j]) / t for j in range(2 * n) if j != i]  # 1 positive + 2N-2 negatives
        total += cross_entropy(dot(z[i], z[partner]) / t, logits)
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(total / (2 * n), rel=1e-5, abs=1e-7)


def test_byol_loss_matches_loop_reference() -> None:
    p, t = torch.randn(5, 3), torch.randn(5, 3)
    expected = sum(2 - 2 * dot(unit(p[i]), unit(t[i])) for i in range(5)) / 5
    assert byol_loss(p, t).item() == pytest.approx(expected, rel=1e-5)
    assert byol_loss(p, 2 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_distances_match_loop_reference_and_vanish_on_equal_inputs() -> None:
    a, b = torch.randn(3, 2, 4), torch.randn(3, 2, 4)  # e.g. (N, L, D) tokens, flattened per sample
    cos = sum(1 - dot(unit(a[i].flatten()), unit(b[i].flatten())) for i in range(3)) / 3
    mse = sum(float(x - y) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert cosine_distance(a, b).item() == pytest.approx(cos, rel=1e-5)
    assert mse_distance(a, b).item() == pytest.approx(mse, rel=1e-5)
    assert cosine_distance(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert mse_distance(a, a.clone()).item() == 0.0


def reference_masked_mse(pred, target, mask, norm_pix: bool) -> float:
    n, length, p = pred.shape
    total, count = 0.0, 0
    for i in range(n):
        for j in range(length):
            if not mask[i, j]:
                continue
            values = [float(v) for v in target[i, j]]
            if norm_pix:
                mean = sum(values) / p
                var = sum((v - mean) ** 2 for v in values) / (p - 1)
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            total += sum((float(pred[i, j, c]) - values[c]) ** 2 for c in range(p)) / p
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_mse_matches_loop_reference(norm_pix: bool) -> None:
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4) * 3 + 1
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float32)
    expected = reference_masked_mse(pred, target, mask, norm_pix)
    assert masked_patch_mse(pred, target, mask, norm_pix=norm_pix).item() == pytest.approx(expected, rel=1e-5)


def test_masked_patch_mse_ignores_unmasked_patches() -> None:
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    changed = pred.clone()
    changed[mask == 0] = 100.0
    assert masked_patch_mse(changed, target, mask).item() == pytest.approx(masked_patch_mse(pred, target, mask).item())
    changed[0, 0] += 1.0  # a masked patch: the loss must move
    assert masked_patch_mse(changed, target, mask).item() != pytest.approx(masked_patch_mse(pred, target, mask).item())
    assert masked_patch_mse(pred, target, torch.zeros(2, 5)).item() == 0.0
