"""What a split server can see: a model-inversion attack on the cut-layer activations of a split method.

In MocoSFL the client runs ``encoder.layers[:cut]`` and sends the activations of its images to the server;
after each sync the server also holds those layers' averaged weights. The attack uses only that:

1. the client-side layers of the FINAL encoder (as the server holds them after the last sync), frozen;
2. the server's OWN auxiliary images: the first ``aux_share`` of the test split (half by default). They
   are never a client's training image (clients hold only the training split), and they come from the same
   distribution, the usual assumption of such attacks; nothing is selected on them;
3. a decoder (``fedssl.privacy.decoder``) trained for a fixed number of Adam steps to map the activations
   of the auxiliary images back to those images (MSE in [0, 1] pixels);
4. then the activations of ``images`` of the clients' training images (round-robin over the clients, from
   the run's own partition) are decoded and scored against the originals.

The activations attacked are those of the un-augmented image: the server really receives augmented views,
but each view is itself a picture of the client's image, and the plain image gives a well-defined original.

Each cut in ``cuts`` is attacked, not only the run's: cut k uses the first k layers of the same trained
encoder, i.e. what the server would see had the run been cut there. The random-init encoder of the same
config (the run's seed) is attacked the same way: an untrained stem leaks differently. Beside them stands
a floor that uses no activation at all (the auxiliary set's mean image as the guess for every image).

Scores: PSNR and SSIM from torchmetrics (chosen over pytorch-msssim because it has both, maintained by the
Lightning team, with documented defaults: data range 1, an 11x11 Gaussian window of sigma 1.5 for SSIM);
each is the mean over the images of the per-image score. Higher = more of the image reaches the server.
The client's peak training memory at each cut is a real measured MocoSFL client step
(``MocoSFL.measure_client_step``), the privacy cost shown beside the memory saving.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedssl.config import InversionConfig, RunConfig, validate, validate_inversion
from fedssl.data.augment import Normalize, to_float
from fedssl.engines.federation import Federation, load_federation, resolve_device
from fedssl.engines.local import restore_final_encoder
from fedssl.engines.loop import torch_threads
from fedssl.errors import ConfigError, FedSSLError
from fedssl.io import atomic_savefig, atomic_write_text
from fedssl.methods import METHODS, build_method
from fedssl.methods.base import MethodContext
from fedssl.methods.split import SplitMethod
from fedssl.models.encoder import Encoder
from fedssl.privacy.decoder import InversionDecoder
from fedssl.run_dir import open_run_dir

RESULT_FILE = "inversion.json"
FIGURE_FILE = "inversion.png"
SSIM_WINDOW = 11  # torchmetrics' default Gaussian window: images need at least this side


# ------------------------------------------------------------------ checks


def check_attackable(cfg: RunConfig) -> None:
    """A ResNet run of a split method, or one FedSSLError naming why not."""
    if cfg.model.arch != "resnet":
        raise FedSSLError(f"the inversion attack decodes ResNet feature maps of a split method; this is a "
                          f"{cfg.model.arch} {cfg.method} run: attack a mocosfl run")
    if not issubclass(METHODS[cfg.method], SplitMethod):
        raise FedSSLError(f"the inversion attack is for split methods (the client sends cut-layer activations); "
                          f"this is a {cfg.method} run, whose clients send weights: attack a mocosfl run")


def check_cuts(encoder: Encoder, cuts: tuple[int, ...]) -> None:
    """Every cut leaves the server at least one layer: 1 <= cut < encoder.num_layers()."""
    top = encoder.num_layers() - 1
    bad = [c for c in cuts if not 1 <= c <= top]
    if bad:
        raise ConfigError(f"--cuts {' '.join(map(str, bad))} out of range: this encoder has {top + 1} layers "
                          f"(stem + blocks), so a cut is 1 to {top}")


# ------------------------------------------------------------------ data


def client_image_indices(fed: Federation, n: int) -> np.ndarray:
    """``n`` indices into ``fed.train`` of the clients' images: each client's first, then each one's second..."""
    longest = max(len(ix) for ix in fed.client_indices)
    order = [ix[j] for j in range(longest) for ix in fed.client_indices if j < len(ix)]
    return np.asarray(order[:n], dtype=np.int64)


def auxiliary_images(fed: Federation, share: float) -> Tensor:
    """The server's own images: the first ``share`` of the test split (uint8 (M, C, H, W))."""
    count = max(1, int(len(fed.test) * share))
    return fed.test.images[:count]


def pixels(images: Tensor, side: int) -> Tensor:
    """uint8 (N, C, H, W) -> float (N, C, side, side) in [0, 1], resized as ``EvalTransform`` resizes."""
    x = to_float(images)
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x


# ------------------------------------------------------------------ the attack on one client-net


class ClientNet(nn.Module):
    """The client side as the server holds it: normalise, then ``encoder.layers[:cut]``, frozen (a copy)."""

    def __init__(self, encoder: Encoder, cut: int, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.layers = nn.Sequential(*copy.deepcopy(list(encoder.layers[:cut])))
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) in [0, 1] -> (N, C', h, w)
        return self.layers(self.normalize(x))


def train_decoder(client: ClientNet, aux: Tensor, inv: InversionConfig, seed: int,
                  device: torch.device) -> tuple[InversionDecoder, float]:
    """A decoder fitted on the auxiliary images ``aux`` (float (M, C, S, S) in [0, 1]); returns it in eval
    mode and the MSE of its last step."""
    torch.manual_seed(seed)
    shape = client(aux[:1].to(device)).shape  # (1, C', h, w)
    decoder = InversionDecoder(shape[1], aux.shape[1], shape[-1], aux.shape[-1], inv.hidden).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=inv.lr)
    picks = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(inv.steps):
        batch = aux[torch.randint(len(aux), (min(inv.batch_size, len(aux)),), generator=picks)].to(device)
        loss = F.mse_loss(decoder(client(batch)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval(), float(loss.detach())


@torch.no_grad()
def reconstruct(client: ClientNet, decoder: InversionDecoder, images: Tensor, device: torch.device,
                batch_size: int = 64) -> Tensor:
    """What the server makes of the clients' ``images`` (float (N, C, S, S) in [0, 1]) -> same shape, on CPU."""
    parts = [decoder(client(images[i:i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def image_scores(recon: Tensor, original: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of ``recon`` against ``original`` (both (N, C, S, S) in [0, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    recon, original = recon.double().clamp(0, 1), original.double()
    psnr = peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(recon, original, data_range=1.0, reduction="elementwise_mean")
    return {"psnr": float(psnr), "ssim": float(ssim)}


def attack_cut(encoder: Encoder, cut: int, normalize: Normalize, aux: Tensor, targets: Tensor,
               inv: InversionConfig, seed: int, device: torch.device) -> tuple[dict[str, Any], Tensor]:
    """Train a decoder at ``cut`` on ``aux``, decode ``targets``: (scores + shapes, reconstructions)."""
    client = ClientNet(encoder, cut, normalize).to(device)
    decoder, aux_mse = train_decoder(client, aux, inv, seed, device)
    recon = reconstruct(client, decoder, targets, device)
    shape = list(client(targets[:1].to(device)).shape[1:])
    return {**image_scores(recon, targets), "aux_mse": aux_mse, "activation_shape": shape}, recon


def client_memory(cfg: RunConfig, fed: Federation, cut: int, device: torch.device) -> int:
    """Measured peak training memory (bytes) of one MocoSFL client step of this run's config cut at ``cut``."""
    at_cut = validate(replace(cfg, split=replace(cfg.split, cut=cut)))
    method = build_method(MethodContext(at_cut, fed.train.info, device))
    return int(method.measure_client_step(fed.client_data(0)).peak_training_bytes)


def floor_scores(aux: Tensor, targets: Tensor) -> dict[str, float]:
    """The scores of a guess that uses no activation: the auxiliary set's mean image, for every image."""
    return image_scores(aux.mean(dim=0, keepdim=True).expand_as(targets), targets)


# ------------------------------------------------------------------ a run directory


def attack_encoders(cfg: RunConfig, trained: Encoder, fed: Federation, side: int, inv: InversionConfig,
                    device: torch.device) -> tuple[dict[str, Any], list[tuple[str, Tensor]]]:
    """Attack the trained and the random-init encoder at every cut: (the result, the picture's rows)."""
    info = fed.train.info
    normalize = Normalize(info.mean, info.std).to(device)
    aux = pixels(auxiliary_images(fed, inv.aux_share), side)  # (M, C, S, S)
    index = client_image_indices(fed, inv.images)
    targets = pixels(fed.train.images[index], side)  # (N, C, S, S)
    untrained = build_method(MethodContext(cfg, info, device)).encoder()  # seeded like the run's start
    rows, shown = [], [("original", targets[:inv.shown])]
    for cut in inv.cuts:
        row: dict[str, Any] = {"cut": cut, "client_peak_training_bytes": client_memory(cfg, fed, cut, device)}
        for name, encoder in (("trained", trained), ("random_init", untrained)):
            row[name], recon = attack_cut(encoder, cut, normalize, aux, targets, inv, cfg.seed + cut, device)
            shown.append((f"cut {cut}, {name.replace('_', ' ')}", recon[:inv.shown]))
        row["activation_shape"] = row["trained"].pop("activation_shape")
        row["random_init"].pop("activation_shape")
        rows.append(row)
    result = {"run_cut": cfg.split.cut, "settings": asdict(inv), "rows": rows,
              "aux": f"the first {len(aux)} of the {len(fed.test)} test-split images",
              "aux_images": len(aux), "client_images": len(targets), "floor": floor_scores(aux, targets),
              "client_image_indices": index.tolist(), "figure": FIGURE_FILE}
    return result, shown


def write_figure(path: Path, rows: list[tuple[str, Tensor]]) -> Path:
    """A grid: one row per (label, images (n, C, S, S) in [0, 1]); the first row is the originals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1.6, 1.1 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                picture = images[c].permute(1, 2, 0).clamp(0, 1).numpy()  # (S, S, C)
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("what a split server can see: clients' images and their reconstructions", fontsize=9)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def attack_run(path: str | Path, inv: InversionConfig | None = None) -> dict[str, Any]:
    """The attack on a finished split run: RUN_DIR/inversion.json and inversion.png (atomically), then the
    run's report again (``fedssl report``) so that it shows them. Returns the result."""
    from fedssl.report import regenerate_report
    from fedssl.version import code_version

    inv = validate_inversion(inv or InversionConfig())
    run, cfg = open_run_dir(path)
    check_attackable(cfg)
    start = time.perf_counter()
    with torch_threads(cfg.threads):
        trained, _, side = restore_final_encoder(run.path)
        check_cuts(trained, inv.cuts)
        if side < SSIM_WINDOW:
            raise FedSSLError(f"{side}x{side} images are smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window; "
                              f"attack a run with image_size >= {SSIM_WINDOW}")
        device = resolve_device(cfg.device)
        fed = load_federation(cfg, pooled=False)
        result, shown = attack_encoders(cfg, trained, fed, side, inv, device)
    result.update(seconds=time.perf_counter() - start, code_version=code_version())
    write_figure(run.path / FIGURE_FILE, shown)
    atomic_write_text(run.path / RESULT_FILE, json.dumps(result, indent=1, sort_keys=True))
    if run.final.is_file():
        regenerate_report(run.path)
    return result


__all__ = ["FIGURE_FILE", "RESULT_FILE", "attack_cut", "attack_run", "check_attackable", "check_cuts",
           "client_image_indices", "image_scores"]
