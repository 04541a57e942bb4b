"""FLOPs of one real step: ``torch.utils.flop_counter.FlopCounterMode``, taught the fused kernels it does not know.

Matmuls, convolutions and attention count (CPU attention, and the no-grad inference path of transformer
layers that frozen blocks take, are added here); element-wise ops, normalisation and optimizer updates
count as zero, as in the papers' counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

Shape = Sequence[int]
aten = torch.ops.aten


def _cpu_attention_flops(query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
    """CPU fused attention, forward: Q K^T and A V (query (B, h, Nq, d), key/value (B, h, Nk, d))."""
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out: Shape, query: Shape, key: Shape, value: Shape, *args: Any,
                                  **kwargs: Any) -> int:
    """CPU fused attention, backward: the four matmuls of the gradients of Q, K and V."""
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _attention_block_flops(batch: int, n_query: int, n_key: int, width: int) -> int:
    """Input projections (Q on n_query tokens, K and V on n_key), Q K^T, A V and the output projection."""
    projections = 2 * batch * (n_query + 2 * n_key) * width * width + 2 * batch * n_query * width * width
    return projections + 2 * 2 * batch * n_query * n_key * width


def _encoder_layer_flops(src: Shape, embed_dim: int, num_heads: int, qkv_weight: Shape, qkv_bias: Shape,
                         proj_weight: Shape, proj_bias: Shape, use_gelu: bool, norm_first: bool, eps: float,
                         norm_weight_1: Shape, norm_bias_1: Shape, norm_weight_2: Shape, norm_bias_2: Shape,
                         ffn_weight_1: Shape, *args: Any, **kwargs: Any) -> int:
    """The fused inference path of ``nn.TransformerEncoderLayer`` (frozen blocks under no_grad, in eval mode).

    src (B, N, D) with batch_first; the MLP is D -> F -> D with ffn_weight_1 (F, D).
    """
    batch, tokens, width = src
    hidden = ffn_weight_1[0]
    return _attention_block_flops(batch, tokens, tokens, width) + 2 * 2 * batch * tokens * width * hidden


def _native_attention_flops(query: Shape, key: Shape, value: Shape, embed_dim: int, *args: Any,
                            **kwargs: Any) -> int:
    """The fused inference path of ``nn.MultiheadAttention``: query (B, Nq, D), key/value (B, Nk, D)."""
    return _attention_block_flops(query[0], query[1], key[1], embed_dim)


FUSED_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    aten._transformer_encoder_layer_fwd: _encoder_layer_flops,
    aten._native_multi_head_attention: _native_attention_flops,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts PyTorch's fused CPU attention and transformer inference kernels."""
    return FlopCounterMode(display=False, custom_mapping=FUSED_FLOP_FORMULAS)
