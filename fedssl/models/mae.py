"""A masked auto-encoder over a stage-wise ViT: what a FedMAE client trains.

At stage k the encoder part is the ViT's ``[patch_embed, block1, ..., block_k+1]``
seen through a :class:`~fedssl.models.staged.StagedEncoder`: the patch embedding and the
frozen blocks run without grad, the stage's new block trains. Three readable steps,
as in MAE (He et al. 2022):

- ``forward_encoder``: patch-embed every patch, keep a random ``1 - mask_ratio`` of
  them (masking by argsort of uniform noise), run the frozen cascade and the active
  block on the VISIBLE tokens only (so no block ever sees a masked patch), final norm;
- ``forward_decoder``: a light decoder (linear embed, mask tokens put back in place,
  sin-cos positions, a few blocks, norm, per-patch pixel prediction);
- ``forward_loss``: MSE on the masked patches only, targets normalised per patch.

The decoder is trained and exchanged in every stage (carried from one stage to the
next: a design choice of this project, the paper's abstract says nothing about it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedssl.config import MAEConfig, SSLConfig
from fedssl.losses import masked_patch_mse
from fedssl.models.vit import init_vit_weights, make_block, patchify, sincos_pos_embed_2d
from fedssl.models.staged import StagedEncoder, StagedModel, run_frozen


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible: ``int(L * (1 - mask_ratio))`` as in MAE (16 of 64 at 0.75, 49 of 196)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (global torch RNG).

    Returns ``ids_keep`` (N, K) the visible patches in shuffled order, ``mask`` (N, L) with
    1 = masked / 0 = visible, and ``ids_restore`` (N, L) that undoes the shuffle.
    """
    keep = visible_count(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device)  # (N, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def keep_tokens(tokens: Tensor, ids_keep: Tensor) -> Tensor:
    """(N, L, D) tokens -> (N, K, D): the tokens at ``ids_keep`` (N, K)."""
    return torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MAEDecoder(nn.Module):
    """Visible latent (N, K, width) + ``ids_restore`` (N, L) -> per-patch pixels (N, L, p*p*C)."""

    pos_embed: Tensor

    def __init__(self, *, width: int, grid: tuple[int, int], patch_dim: int, cfg: MAEConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        table = sincos_pos_embed_2d(cfg.decoder_width, grid)[None]  # (1, L, decoder_width), never sent
        self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.Sequential(*(make_block(cfg.decoder_width, cfg.decoder_heads)
                                      for _ in range(cfg.decoder_depth)))
        self.norm = nn.LayerNorm(cfg.decoder_width, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_width, patch_dim)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        n, length = ids_restore.shape
        x = self.embed(latent)  # (N, K, Dd)
        masks = self.mask_token.expand(n, length - x.shape[1], -1)  # (N, L-K, Dd)
        x = torch.cat([x, masks], dim=1)  # (N, L, Dd) in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # back in patch order
        x = self.blocks(x + self.pos_embed)
        return self.pred(self.norm(x))  # (N, L, p*p*C)


class MaskedAutoencoder(StagedModel):
    """One-block-per-stage MAE: ``encoder`` (a StagedEncoder over a ViT) + ``decoder``; no momentum branch."""

    online_names = ("encoder", "decoder")

    def __init__(self, encoder: StagedEncoder, ssl: SSLConfig, mae: MAEConfig) -> None:
        super().__init__(encoder, ssl)
        vit = encoder.backbone
        patch_embed = vit.layers[0]
        self.mae = mae
        self.patch_size = int(patch_embed.patch_size)
        self.num_patches = int(patch_embed.num_patches)
        channels = int(patch_embed.proj.in_channels)
        self.decoder = MAEDecoder(width=encoder.feature_dim, grid=patch_embed.grid,
                                  patch_dim=self.patch_size ** 2 * channels, cfg=mae)

    def _run(self, indices: list[int] | range, h: Tensor, ids_keep: Tensor) -> Tensor:
        """Layers ``indices`` in order; right after the patch embedding (layer 0) only the visible tokens go on."""
        layers = self.encoder.backbone.layers
        for i in indices:
            h = layers[i](h)
            if i == 0:
                h = keep_tokens(h, ids_keep)  # (N, L, D) -> (N, K, D)
        return h

    def cascade_input(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """The stage's frozen part on the visible patches, no grad: (N, C, H, W) -> the active block's input.

        At stage 0 (nothing frozen) this is the images themselves.
        """
        frozen = self.encoder.stage.frozen
        if not frozen:
            return imgs
        layers = self.encoder.backbone.layers
        with torch.no_grad():
            h = keep_tokens(run_frozen([layers[0]], imgs), ids_keep)  # (N, K, D) visible patch embeddings
        return run_frozen([layers[i] for i in frozen[1:]], h)

    def forward_encoder(self, imgs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, H, W) -> visible latent (N, K, width), mask (N, L), ids_restore (N, L)."""
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, self.mae.mask_ratio,
                                                     imgs.device)
        h = self._run(self.encoder.stage.active, self.cascade_input(imgs, ids_keep), ids_keep)
        return self.encoder.backbone.norm(h), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        return self.decoder(latent, ids_restore)  # (N, L, p*p*C)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Normalised-pixel MSE over the masked patches only."""
        return masked_patch_mse(pred, patchify(imgs, self.patch_size), mask, norm_pix=self.mae.norm_pix)

    def reconstruct(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> predicted patches (N, L, p*p*C) and the mask (N, L) used."""
        latent, mask, ids_restore = self.forward_encoder(imgs)
        return self.forward_decoder(latent, ids_restore), mask

    def loss(self, view: Tensor) -> Tensor:  # type: ignore[override]  # MAE: one view
        pred, mask = self.reconstruct(view)
        return self.forward_loss(view, pred, mask)


__all__ = ["MAEDecoder", "MaskedAutoencoder", "keep_tokens", "random_masking", "visible_count"]
