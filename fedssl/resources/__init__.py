"""Exact per-client accounting: what a client holds (memory), computes (FLOPs) and sends (bytes).

Three measurements, none of them an estimate made beside the real code:

- bytes on the wire: :func:`payload_bytes` of the very tensors a method sends;
- FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` around one real
  training step, taught the fused kernels it does not know (CPU attention,
  the no-grad inference path of transformer layers that frozen blocks take)
  (matmuls, convolutions and attention; element-wise ops,
  normalisation and optimizer updates count as zero, as in the papers' counts);
- memory: the allocator's own alloc/free events during that same step
  (CPU: the PyTorch profiler's ``[memory]`` events; CUDA: the caching
  allocator's peak statistic), plus the bytes autograd saved for backward.

A :class:`Ledger` keeps one row per (round, client, kind) and sums them up. One module per job:
``flops.py`` (the FLOP counter), ``memory.py`` (a measured step: :func:`measure_step`, :class:`StepCost`),
``ledger.py`` (bytes of tensors, the :class:`Ledger`, numbers for humans); this package exports them all.
"""

from __future__ import annotations

from fedssl.resources.flops import flop_counter
from fedssl.resources.ledger import (DOWNLOAD, REFERENCE_STEP_COST, SERVER_ID, SERVER_STEP_COST, STEP_COST, UPLOAD,
                                     Ledger, human_bytes, human_flops, payload_bytes, tensor_bytes)
from fedssl.resources.memory import StepCost, measure_step

__all__ = [
    "DOWNLOAD",
    "REFERENCE_STEP_COST",
    "SERVER_ID",
    "SERVER_STEP_COST",
    "STEP_COST",
    "UPLOAD",
    "Ledger",
    "StepCost",
    "human_bytes",
    "flop_counter",
    "human_flops",
    "measure_step",
    "payload_bytes",
    "tensor_bytes",
]
