"""Export a trained encoder as a self-contained module that needs only torch to load.

The module maps a float tensor (N, C, H, W) in [0, 1] at the training
resolution to features (N, D); normalisation happens inside. Two formats,
chosen by the file's suffix (:func:`format_of`):

- ``.pt2``: ``torch.export`` (an ``ExportedProgram``); load with
  ``torch.export.load(path).module()``;
- anything else (e.g. ``.pt``, the default): TorchScript, load with ``torch.jit.load(path)``
  (still supported by torch, deprecated upstream).

Both are traced from an *inference copy* (:func:`inference_module`): CPU, eval
mode, no parameter requiring grad, traced under ``torch.no_grad()``. That is the
regime ``fedssl eval`` extracts features in, and it matters: an
``nn.TransformerEncoderLayer`` picks its kernel at run time (the fused fast path
only in eval mode when grad is off or none of its weights requires grad), so a
trace taken in grad mode records whichever path the training-time
``requires_grad`` flags select (a staged ViT ends with frozen blocks on the fast
path and the last block on the slow one), while ``torch.jit.trace``'s check
re-traces under ``no_grad`` and gets another graph ("Graphs differed across
invocations").
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fedssl.errors import FedSSLError
from fedssl.io import atomic_write_bytes

EXPORT_SUFFIX = ".pt2"  # torch.export; every other suffix writes TorchScript
LOADERS = {"torch.export": "torch.export.load(path).module()", "TorchScript": "torch.jit.load(path)"}


class NormalizedEncoder(nn.Module):
    """[0, 1] images -> normalised -> encoder features."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [0, 1] -> (N, D)
        return self.encoder((images - self.mean) / self.std)


def format_of(path: str | Path) -> str:
    """The format a path gets: ``"torch.export"`` for ``.pt2``, else ``"TorchScript"`` (a key of ``LOADERS``)."""
    return "torch.export" if Path(path).suffix == EXPORT_SUFFIX else "TorchScript"


def inference_module(encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> NormalizedEncoder:
    """A CPU copy of ``encoder`` behind the normalisation, in eval mode, with no parameter requiring grad."""
    module = NormalizedEncoder(copy.deepcopy(encoder).cpu(), mean, std)
    return module.eval().requires_grad_(False)


def torchscript_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``torch.jit.trace`` of ``module`` on ``example`` (N, C, H, W), serialised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but remains a loader-only format
        traced = torch.jit.trace(module, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def exported_program_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``torch.export`` of ``module`` with a dynamic batch dimension, serialised as a ``.pt2``."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the ResNet's channels_last weights are dense but not "contiguous": torch warns, and saves them whole
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, buffer)
    return buffer.getvalue()


WRITERS: dict[str, Callable[[nn.Module, Tensor], bytes]] = {
    "torch.export": exported_program_bytes, "TorchScript": torchscript_bytes,
}


def export_encoder(encoder: nn.Module, *, mean: Sequence[float], std: Sequence[float], channels: int,
                   image_size: int, path: str | Path) -> str:
    """Write the normalised encoder to ``path`` atomically, in the format of its suffix; returns that format."""
    fmt = format_of(path)
    module = inference_module(encoder, mean, std)
    example = torch.rand(2, channels, image_size, image_size)  # (2, C, H, W): batch 2, so it stays dynamic
    with torch.no_grad():
        data = WRITERS[fmt](module, example)
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise FedSSLError(f"cannot write {path} ({err.strerror or err}); pass --out a file in a writable folder") from None
    return fmt


__all__ = ["EXPORT_SUFFIX", "LOADERS", "NormalizedEncoder", "WRITERS", "export_encoder", "exported_program_bytes",
           "format_of", "inference_module", "torchscript_bytes"]
