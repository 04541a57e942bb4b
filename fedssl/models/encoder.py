"""The contract every backbone follows: an image encoder as an ORDERED list of layers.

A cut point (MocoSFL), a stage (LW-FedSSL / Prog-FedSSL) or a cascade depth
(FedMAE) is just an index ``k`` into ``encoder.layers``:

    h = encoder.forward_to(x, k)        # layers[0 .. k-1]           (client side / frozen part)
    z = encoder.forward_from(h, k)      # layers[k ..] + pool -> (N, D) (server side / trainable part)

so ``forward_from(forward_to(x, k), k) == forward(x)`` for every ``k`` in
``0 .. num_layers()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fedssl.errors import ConfigError


class Encoder(nn.Module):
    """An image encoder as an ORDERED list of modules (cut points / stages).

    ``layers[0]`` is the stem / patch embedding, ``layers[1..]`` are the blocks.
    ``norm`` holds the parameters ``pool`` owns (``nn.Identity`` when it has none);
    it lives outside ``layers`` because it belongs to no cut.
    Subclasses implement ``pool``.
    """

    layers: nn.ModuleList
    feature_dim: int

    def __init__(self, layers: Sequence[nn.Module], layer_dims: Sequence[int], feature_dim: int,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if len(layers) != len(layer_dims):
            raise ConfigError(f"got {len(layers)} layers but {len(layer_dims)} layer widths: give one width per layer.")
        self.layers = nn.ModuleList(layers)
        self.norm = norm if norm is not None else nn.Identity()
        self.feature_dim = int(feature_dim)
        self._layer_dims = [int(d) for d in layer_dims]

    def num_layers(self) -> int:
        """Number of layers (cut points are ``0 .. num_layers()``)."""
        return len(self.layers)

    def layer_dims(self) -> list[int]:
        """Channel / token width of each layer's output (for adapters)."""
        return list(self._layer_dims)

    def _check_index(self, k: int, name: str = "k") -> None:
        if not 0 <= k <= len(self.layers):
            raise ConfigError(f"{name}={k} is out of range: choose a value between 0 and {len(self.layers)}.")

    def run_layers(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Run ``layers[start .. stop-1]`` on ``h`` (the output of ``layers[start-1]``, or the image)."""
        self._check_index(start, "start")
        self._check_index(stop, "stop")
        if start > stop:
            raise ConfigError(f"start={start} is after stop={stop}: pass start <= stop.")
        for layer in self.layers[start:stop]:
            h = layer(h)
        return h

    def forward_to(self, x: Tensor, k: int) -> Tensor:
        """Output of ``layers[0 .. k-1]``; ``k = 0`` returns ``x`` itself."""
        return self.run_layers(x, 0, k)

    def forward_from(self, h: Tensor, k: int) -> Tensor:
        """Run ``layers[k ..]`` on ``h`` (output of ``forward_to(x, k)``), then ``pool`` -> (N, D)."""
        return self.pool(self.run_layers(h, k, len(self.layers)))

    def pool(self, h: Tensor) -> Tensor:
        """Final norm / pooling of a layer's output -> (N, width of that layer)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, feature_dim)."""
        return self.forward_from(x, 0)


def preset_kwargs(arch: str, presets: dict[str, dict[str, Any]], preset: str | None,
                  overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments: the named preset's (if any), then ``overrides`` on top."""
    config: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown {arch} preset {preset!r}: choose one of {sorted(presets)}.")
        config.update(presets[preset])
    config.update(overrides)
    return config


__all__ = ["Encoder", "preset_kwargs"]
