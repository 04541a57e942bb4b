"""Export a trained encoder as a self-contained TorchScript module.

The module maps a float tensor (N, C, H, W) in [0, 1] at the training
resolution to features (N, D); normalisation happens inside, so a user needs
only ``torch.jit.load``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fedssl.io import atomic_write_bytes


class NormalizedEncoder(nn.Module):
    """[0, 1] images -> normalised -> encoder features."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [0, 1] -> (N, D)
        return self.encoder((images - self.mean) / self.std)


def export_encoder(encoder: nn.Module, *, mean: Sequence[float], std: Sequence[float], channels: int,
                   image_size: int, path: str | Path) -> torch.jit.ScriptModule:
    """Trace the normalised encoder on CPU in eval mode and write it atomically to ``path``."""
    import copy

    module = NormalizedEncoder(copy.deepcopy(encoder).cpu().eval(), mean, std).eval()
    example = torch.rand(2, channels, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but remains the loader-only format
        traced = torch.jit.trace(module, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return traced
