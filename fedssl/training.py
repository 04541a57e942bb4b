"""Local training: batches, optimizers, the LR schedule and the SSL step loop.

Shared by every method (a client's local epochs, centralized training, the
server's calibration steps) so that "the same local budget" means the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from fedssl.config import RunConfig
from fedssl.data.datasets import ImageData
from fedssl.errors import DivergedError
from fedssl.models.ssl import SSLModel

Augment = Callable[[Tensor], tuple[Tensor, ...]]  # uint8 batch -> the views the model's loss takes


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, client ...), stable across runs and platforms."""
    acc = 0x9E3779B97F4A7C15
    for part in parts:
        acc = (acc ^ (int(part) + 0x632BE59BD9B4E019 + (acc << 6) + (acc >> 2))) & 0xFFFFFFFFFFFFFFFF
    return acc & 0x7FFFFFFFFFFFFFFF


def batch_indices(num_samples: int, batch_size: int, *, epochs: int, steps: int,
                  generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches: ``steps`` batches if steps > 0, else ``epochs`` passes.

    A trailing batch of one sample is dropped (two views of one image have no negatives).
    """
    if num_samples < 2:
        return
    size = min(batch_size, num_samples)
    done = 0
    epoch = 0
    while (steps > 0 and done < steps) or (steps == 0 and epoch < epochs):
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, size):
            idx = order[start:start + size]
            if idx.numel() < 2:
                continue
            yield idx
            done += 1
            if steps > 0 and done >= steps:
                return
        epoch += 1


def round_lr(cfg: RunConfig, round_index: int) -> float:
    """The learning rate of a round: linear warm-up over ``warmup_rounds`` (round r at (r+1)/(W+1) of the rate),
    then cosine decay over the rest (to 0 at the end) or constant."""
    warm = cfg.warmup_rounds
    if round_index < warm:
        return cfg.lr * (round_index + 1) / (warm + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (round_index - warm) / (cfg.rounds - warm)))


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)


@dataclass
class LocalStats:
    """What a stretch of local training did."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "steps": self.steps, "images": self.images}


def ssl_step(model: SSLModel, optimizer: torch.optim.Optimizer, images: Tensor, augment: Augment) -> float:
    """One SSL step on a uint8 batch (N, C, H, W): views (two for contrastive objectives, one for MAE), loss,
    backward, update, EMA."""
    loss = model.loss(*augment(images))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.after_step()
    return float(loss.detach())


def train_local(model: SSLModel, data: ImageData, augment: Augment, optimizer: torch.optim.Optimizer, *,
                cfg: RunConfig, generator: torch.Generator, device: torch.device) -> LocalStats:
    """Local epochs (or ``cfg.local_steps`` steps) of SSL on one client's data."""
    stats = LocalStats()
    model.train()
    for idx in batch_indices(len(data), cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps,
                             generator=generator):
        loss = ssl_step(model, optimizer, data.images[idx].to(device), augment)
        if not math.isfinite(loss):
            raise DivergedError(f"the SSL loss became {loss}; lower the learning rate (--set lr=...) or check the data")
        stats.loss_sum += loss
        stats.steps += 1
        stats.images += int(idx.numel())
    return stats
