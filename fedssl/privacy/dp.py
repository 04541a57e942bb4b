"""Client-level differential privacy of the round-based methods: DP-FedAvg (McMahan et al., ICLR 2018).

What is protected: a whole client's data (every image it holds), against anyone who sees the released models
(the global model after any round, the exported encoder), for the ``[privacy]`` settings and the accountant's
(epsilon, delta) (``fedssl.privacy.accountant``). The server is trusted (central DP): it sees each clipped update.

The mechanism, per round:

- client side (:func:`clip_upload`, in ``FedAvgClient.train``, the client role every round-based method shares, so
  it is also what a Flower node sends): the update ``upload - download`` over every exchanged FLOATING tensor
  (one vector: the online network, heads, a stage's adapter ...) is scaled to L2 norm <= ``clip_norm``; the
  upload sent is ``download + clipped update``. Integer tensors are no part of the update;
- server side (:func:`private_average`): each received update is clipped again (a client that did not clip, or
  float32 rounding, cannot exceed the bound the accountant assumes), summed, and Gaussian noise of std
  ``noise_multiplier * clip_norm`` is added to the sum per coordinate; the sum is divided by the number of
  clients the round SAMPLES (:func:`clients_per_round`), not by how many replied, and every client weighs the
  same (a data-size weight would itself depend on the client's data). A client that dropped out or failed adds
  nothing: the fixed denominator keeps the sensitivity at ``clip_norm / m``;
- integer tensors keep the server's value (a client's ``num_batches_tracked`` would tell its data size);
- server momentum (FedAvgM) and LW-FedSSL's server calibration on its own data come after the noise: they only
  post-process the private release.

BatchNorm is refused with DP (``FedAvgSSL.validate``): its running statistics are a data-dependent upload too,
so they would have to be clipped and noised with the weights, and a noised running variance can turn negative;
the default GroupNorm (and the ViT's LayerNorm) hold no running statistics.

The noise: a torch generator per round, seeded by ``derive_seed(noise_key, round)``, so a resumed run draws
exactly the noise the uninterrupted one would. ``noise_key`` is drawn from the OS's entropy when the run starts
and kept in the checkpoint (server state, never in config.toml or the report); with
``privacy.reproducible_noise`` it is derived from ``seed`` instead (two runs of one config are then identical, and
the noise can be recomputed by whoever knows the config: the guarantee then holds only while the seed is
secret). A research implementation: torch's generator is not a cryptographic one, and floating-point Gaussian
samples leak through their low bits (Mironov, CCS 2012); a production deployment needs a secure sampler.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor

from fedssl.config import RunConfig, clients_per_round  # noqa: F401 (re-exported: the sampler's m)
from fedssl.training import derive_seed

Payload = dict[str, Tensor]
NOISE_STREAM = 0xD9  # derive_seed tag of the noise generators


def update_of(upload: Payload, download: Payload) -> dict[str, Tensor]:
    """upload - download per floating tensor, in float64 (integer tensors are not part of the update)."""
    return {k: v.to(torch.float64) - download[k].to(torch.float64) for k, v in upload.items()
            if torch.is_floating_point(v)}


def global_norm(update: dict[str, Tensor]) -> float:
    """The L2 norm of all tensors of ``update`` taken as one vector."""
    return math.sqrt(sum(float((d * d).sum()) for d in update.values()))


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / norm): the scale that brings an update of L2 norm ``norm`` within ``clip_norm``."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_upload(upload: Payload, download: Payload, clip_norm: float) -> tuple[Payload, bool]:
    """Client side: the upload whose update (``upload - download``) has L2 norm <= ``clip_norm``, and whether
    it had to be scaled. Integer tensors are sent as they are (the server never averages them in)."""
    update = update_of(upload, download)
    factor = clip_factor(global_norm(update), clip_norm)
    if factor == 1.0:
        return upload, False
    out = dict(upload)
    for key, delta in update.items():
        out[key] = (download[key].to(torch.float64) + factor * delta).to(upload[key].dtype)
    return out, True


def noised_sum(current: Payload, uploads: list[Payload], clip_norm: float, noise_std: float,
               generator: torch.Generator) -> dict[str, Tensor]:
    """sum_i clip(upload_i - current) + N(0, noise_std^2) per coordinate, over current's floating tensors
    (float64, in current's key order so that one generator state always gives the same noise)."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items() if torch.is_floating_point(v)}
    for upload in uploads:
        update = update_of({k: upload[k] for k in total}, current)
        factor = clip_factor(global_norm(update), clip_norm)
        for key, delta in update.items():
            total[key].add_(delta, alpha=factor)
    if noise_std > 0:
        for key, value in total.items():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)  # on the CPU: one stream
            value.add_(noise.to(value.device), alpha=noise_std)
    return total


def private_average(current: Payload, uploads: list[Payload], cfg: RunConfig, sample_size: int,
                    generator: torch.Generator) -> Payload:
    """Server side: current + (noised sum of the clipped updates) / sample_size, in current's dtypes; integer
    tensors keep the server's value. ``sample_size``: the clients the round sampled (:func:`clients_per_round`)."""
    p = cfg.privacy
    total = noised_sum(current, uploads, p.clip_norm, p.noise_multiplier * p.clip_norm, generator)
    out = {k: v.clone() for k, v in current.items()}
    for key, value in total.items():
        out[key] = (current[key].to(torch.float64) + value / sample_size).to(current[key].dtype)
    return out


def new_noise_key(cfg: RunConfig) -> int:
    """The run's noise key: from the OS's entropy (kept in the checkpoint only), or from ``seed`` when
    ``privacy.reproducible_noise``."""
    if cfg.privacy.reproducible_noise:
        return derive_seed(cfg.seed, NOISE_STREAM)
    return secrets.randbits(63)


def noise_generator(noise_key: int, round_index: int) -> torch.Generator:
    """The generator of one round's noise (a function of the key and the round only: resumes draw the same)."""
    return torch.Generator().manual_seed(derive_seed(noise_key, round_index, NOISE_STREAM))
