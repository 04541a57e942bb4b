"""The server's inversion decoder: cut-layer activations (N, C, h, w) -> images (N, C_img, H, W) in [0, 1].

A small convolutional decoder sized by the activation it reads. Design (chosen here, not a paper's):

- a 3x3 conv from the C activation channels to ``hidden`` channels, then one (nearest x2 upsample, 3x3 conv)
  stage per factor of 2 between the activation's side and the image's, so a stride-2 cut gets one more
  stage and the decoder is no weaker where the cut downsamples; a final bilinear resize covers sides that
  are not a power of 2 apart (28 -> 7 -> 4 on Fashion-MNIST);
- BatchNorm after each conv: the decoder lives on the server, which trains it on batches of its own images,
  so batch statistics are sound there (unlike on the clients' one-image steps);
- channels-last memory layout: about 1.5-3x faster on CPU here;
- a sigmoid output, so reconstructions are pixels in [0, 1], the range PSNR and SSIM are computed in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def upsample_stages(activation_side: int, image_side: int) -> int:
    """How many x2 upsampling stages bring ``activation_side`` to at least ``image_side`` (0 at full size)."""
    return max(0, math.ceil(math.log2(image_side / activation_side) - 1e-9))


class InversionDecoder(nn.Module):
    """(N, C, h, w) activations -> (N, out_channels, image_side, image_side) images in [0, 1]."""

    def __init__(self, in_channels: int, out_channels: int, activation_side: int, image_side: int,
                 hidden: int = 64) -> None:
        super().__init__()
        layers = _conv_block(in_channels, hidden)
        for _ in range(upsample_stages(activation_side, image_side)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv_block(hidden, hidden)]
        layers += [*_conv_block(hidden, hidden), nn.Conv2d(hidden, out_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.image_side = image_side
        self.to(memory_format=torch.channels_last)  # oneDNN's fast path on CPU, as the ResNets use


    def forward(self, h: Tensor) -> Tensor:
        x = self.body(h.contiguous(memory_format=torch.channels_last))  # (N, out_channels, h * 2**stages, ...)
        if x.shape[-1] != self.image_side or x.shape[-2] != self.image_side:
            x = F.interpolate(x, size=(self.image_side, self.image_side), mode="bilinear", align_corners=False)
        return x.sigmoid()  # pixels in [0, 1]


__all__ = ["InversionDecoder", "upsample_stages"]
