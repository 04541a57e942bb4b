"""Pictures of a masked auto-encoder at work: masked input, reconstruction, original, one row per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from fedssl.data.augment import Normalize, to_float
from fedssl.io import atomic_savefig
from fedssl.models.mae import MaskedAutoencoder
from fedssl.models.vit import patchify, unpatchify

MASKED_GREY = 0.5  # what a hidden patch shows in the "masked input" column


@torch.no_grad()
def reconstruction_triplets(model: MaskedAutoencoder, images: Tensor, mean: Sequence[float], std: Sequence[float],
                            seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 (n, C, H, W) -> masked input, reconstruction, original: each (n, C, H, W) in [0, 1].

    The mask is drawn from ``seed`` (the same patches hidden in every call), the caller's RNG is
    left untouched. The reconstruction shows the visible patches as they are and the predicted
    ones in place of the hidden patches; with normalised-pixel targets a prediction is mapped back
    with the true patch's own mean and variance (as MAE's visualisations do).
    """
    normalize = Normalize(mean, std).to(images.device)
    x = normalize(to_float(images))  # (n, C, H, W)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pred, mask = model.reconstruct(x)  # (n, L, p*p*C), (n, L)
    finally:
        model.train(was_training)
    p, c = model.patch_size, x.shape[1]
    target = patchify(x, p)  # (n, L, p*p*C)
    if model.mae.norm_pix:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    hidden = mask.unsqueeze(-1)  # (n, L, 1), 1 = masked
    grid = model.encoder.backbone.layers[0].grid

    def pixels(patches: Tensor) -> Tensor:  # normalised patches -> [0, 1] images
        img = unpatchify(patches, p, c, grid)
        return (img * normalize.std + normalize.mean).clamp(0, 1)

    original = pixels(target)
    masked = original * pixels_mask(1 - hidden, p, c, grid) + MASKED_GREY * pixels_mask(hidden, p, c, grid)
    reconstruction = pixels(target * (1 - hidden) + pred * hidden)
    return masked, reconstruction, original


def pixels_mask(per_patch: Tensor, p: int, c: int, grid: tuple[int, int]) -> Tensor:
    """(n, L, 1) per-patch weights -> (n, C, H, W) per-pixel weights."""
    return unpatchify(per_patch.expand(-1, -1, p * p * c), p, c, grid)


def save_reconstructions(model: MaskedAutoencoder, images: Tensor, mean: Sequence[float], std: Sequence[float],
                         path: Path, *, title: str, seed: int) -> Path:
    """Write a PNG (atomically): one row per image, columns masked input / reconstruction / original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = reconstruction_triplets(model, images, mean, std, seed)
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(3 * 1.4, rows * 1.4 + 0.5), squeeze=False)
    for j, name in enumerate(("masked input", "reconstruction", "original")):
        axes[0, j].set_title(name, fontsize=8)
        for i in range(rows):
            img = columns[j][i].permute(1, 2, 0).cpu().numpy()  # (H, W, C)
            axes[i, j].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)


__all__ = ["reconstruction_triplets", "save_reconstructions"]
