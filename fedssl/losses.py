"""Self-supervised losses as plain functions; shapes in the docstrings.

No function detaches anything: the caller decides which side carries gradient
(e.g. MoCo keys come from a momentum network under ``torch.no_grad()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedssl.errors import ConfigError


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be positive: pass e.g. 0.1 (MoCo) or 0.5 (SimCLR).")


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; both sides need the same shape.")


def info_nce(query: Tensor, key: Tensor, queue: Tensor | None = None, *, temperature: float = 0.1,
             in_batch_negatives: bool = True) -> Tensor:
    """MoCo InfoNCE, the mean cross-entropy of picking key i for query i.

    query, key: (N, D), L2-normalised here. queue: (K, D) already-normalised negatives, or None; K = 0 is allowed.
    Negatives of query i: the other N-1 keys (if ``in_batch_negatives``) and every queue row.
    MoCo v2: ``in_batch_negatives=False`` with a queue. MoCo v3: ``True`` with no queue (the caller scales by 2T).
    With no negatives at all (N = 1 and no queue, or no in-batch negatives and an empty queue) the only logit
    is the positive and the loss is exactly 0.
    Returns a scalar.
    """
    _check_temperature(temperature)
    _check_pair(query, key)
    q = F.normalize(query, dim=1)  # (N, D)
    k = F.normalize(key, dim=1)  # (N, D)
    if in_batch_negatives:
        logits = q @ k.T  # (N, N): positives on the diagonal
        labels = torch.arange(q.shape[0], device=q.device)
    else:
        logits = (q * k).sum(dim=1, keepdim=True)  # (N, 1): the positive is column 0
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if queue is not None:
        if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue has shape {tuple(queue.shape)}; it needs (K, {q.shape[1]}).")
        logits = torch.cat([logits, q @ queue.to(q.dtype).T], dim=1)  # (N, N + K) or (N, 1 + K)
    return F.cross_entropy(logits / temperature, labels)


def symmetric_info_nce(q1: Tensor, k2: Tensor, q2: Tensor, k1: Tensor, queue: Tensor | None = None, *,
                       temperature: float = 0.1, in_batch_negatives: bool = True) -> Tensor:
    """Mean of ``info_nce(q1, k2)`` and ``info_nce(q2, k1)``: both view orders. All (N, D); queue (K, D)."""
    loss_12 = info_nce(q1, k2, queue, temperature=temperature, in_batch_negatives=in_batch_negatives)
    loss_21 = info_nce(q2, k1, queue, temperature=temperature, in_batch_negatives=in_batch_negatives)
    return (loss_12 + loss_21) / 2


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent: z1, z2 (N, D) two views; each of the 2N samples has 1 positive and 2N-2 negatives.

    Returns the mean over the 2N anchors (a scalar).
    """
    _check_temperature(temperature)
    _check_pair(z1, z2)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # i <-> i + N
    return F.cross_entropy(logits, labels)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL: mean over the batch of 2 - 2 cos(prediction_i, target_i); inputs (N, D), result in [0, 4]."""
    _check_pair(prediction, target)
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of 1 - cos(a_i, b_i); each sample (N, ...) is flattened to one vector. 0 when a == b."""
    _check_pair(a, b)
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()


def mse_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference over all elements of (N, ...) tensors (= mean over the batch of the per-sample mean)."""
    _check_pair(a, b)
    return F.mse_loss(a, b)


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor, *, norm_pix: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """MAE reconstruction loss: mean over masked patches of the per-patch mean squared error.

    pred, target: (N, L, P) with P = p*p*C (see ``fedssl.models.vit.patchify``); mask: (N, L), 1 = masked.
    ``norm_pix``: each target patch is normalised by its own mean and (unbiased, as in MAE) variance + ``eps``.
    Returns 0 when nothing is masked.
    """
    _check_pair(pred, target)
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it needs {tuple(pred.shape[:2])} (N, L).")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # (N, L, 1)
        var = target.var(dim=-1, keepdim=True)  # (N, L, 1)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


__all__ = [
    "byol_loss", "cosine_distance", "info_nce", "masked_patch_mse", "mse_distance", "nt_xent", "symmetric_info_nce",
]
