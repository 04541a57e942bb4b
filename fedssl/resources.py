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

A :class:`Ledger` keeps one row per (round, client, kind) and sums them up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fedssl.errors import CheckpointError, FedSSLError
from fedssl.io import atomic_write_text

__all__ = [
    "DOWNLOAD",
    "REFERENCE_STEP_COST",
    "SERVER_ID",
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

UPLOAD = "upload"
DOWNLOAD = "download"
STEP_COST = "step_cost"
SERVER_STEP_COST = "server_step_cost"  # split methods: the server's part of a step
SERVER_ID = -1  # the ``client`` of the server's own rows (e.g. SERVER_STEP_COST): never counted as a client
REFERENCE_STEP_COST = "reference_step_cost"  # the client step of the method's reference (Method.reference_cost)


# ---------------------------------------------------------------------------
# bytes of tensors
# ---------------------------------------------------------------------------


def tensor_bytes(t: Tensor) -> int:
    """Bytes of the tensor's elements: ``numel * element_size`` (what serialising it sends)."""
    return t.numel() * t.element_size()


def payload_bytes(payload: Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    """Bytes of the real tensors in a message (a state dict or a list of tensors).

    Every entry is counted, even two that share storage: each is sent.
    Keys and framing overhead are not counted.
    """
    tensors = payload.values() if isinstance(payload, Mapping) else payload
    total = 0
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"payload holds a {type(t).__name__}, expected only tensors")
        total += tensor_bytes(t)
    return total


def _held_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of memory the tensors occupy: each distinct storage counted once.

    Tied weights or views of one buffer are one allocation, so they count once.
    """
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    storages.pop(0, None)  # empty tensors own no memory
    return sum(storages.values())


def _params_and_buffers(modules: Sequence[nn.Module]) -> Iterator[Tensor]:
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()


def _grads(modules: Sequence[nn.Module]) -> list[Tensor]:
    return [p.grad for m in modules for p in m.parameters() if p.grad is not None]


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


# ---------------------------------------------------------------------------
# FLOPs of fused kernels that FlopCounterMode does not count by itself
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# one measured training step
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Cost of one real training step of one client (all sizes in bytes).

    ``peak_bytes`` is the transient high-water mark: the largest value, during
    the step, of (bytes allocated since the step began − bytes freed since the
    step began). It holds activations, temporaries, the batch if the step
    creates it, and grads / optimizer state the step creates; memory freed in
    the step (e.g. grads dropped by ``zero_grad()``) lowers it.
    ``held_before_bytes`` is what the client already held when the step began:
    parameters and buffers of ``modules`` plus their existing grads and
    existing optimizer state. Their sum, :attr:`peak_training_bytes`, is the
    client's peak memory during training.
    """

    flops_per_image: float
    peak_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    held_before_bytes: int

    @property
    def peak_training_bytes(self) -> int:
        """Measured peak memory of the client while training: held before the step + transient peak."""
        return self.held_before_bytes + self.peak_bytes

    @property
    def estimated_bytes(self) -> int:
        """Analytic memory: parameters + grads + optimizer state + activations saved for backward."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, float | int]:
        """All fields and both derived totals, as plain numbers (e.g. for a :class:`Ledger` row)."""
        return {
            **asdict(self),
            "peak_training_bytes": self.peak_training_bytes,
            "estimated_bytes": self.estimated_bytes,
        }


class _SavedTensorMeter:
    """Tracks the largest number of bytes autograd holds for backward at one time.

    Installed with ``saved_tensors_hooks``: each saved tensor is wrapped in a
    :class:`_SavedRef` whose lifetime is the saved reference's lifetime. A
    storage (dedup by data pointer) counts from its first saved reference until
    its last one is released (after backward). Storages of ``excluded``
    pointers (the model's own parameters and buffers) are not activations.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.refs: dict[int, int] = defaultdict(int)  # storage pointer -> live saved references
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def pack(self, t: Tensor) -> _SavedRef | Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.excluded:
            return t
        if self.refs[ptr] == 0:
            self.sizes[ptr] = storage.nbytes()
            self.current += self.sizes[ptr]
            self.peak = max(self.peak, self.current)
        self.refs[ptr] += 1
        return _SavedRef(t, ptr, self)

    @staticmethod
    def unpack(saved: _SavedRef | Tensor) -> Tensor:
        return saved.tensor if isinstance(saved, _SavedRef) else saved

    def release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.current -= self.sizes.pop(ptr)


class _SavedRef:
    """A tensor saved for backward; tells the meter when autograd lets go of it."""

    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor: Tensor, ptr: int, meter: _SavedTensorMeter) -> None:
        self.tensor = tensor
        self.ptr = ptr
        self.meter = meter

    def __del__(self) -> None:
        self.meter.release(self.ptr)


def _rehome_state(modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Replace existing grads and optimizer state by fresh copies of themselves.

    Called inside the profiler: the CPU allocator reports a free only for
    blocks allocated while profiling was on, so a grad allocated before the
    step and freed by ``zero_grad()`` in it would go unseen and inflate the
    peak. The copies are allocated under the profiler, so their frees are seen.
    Values, shapes and identities of parameters are unchanged.
    """
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    state[key] = value.clone()


_STEP_MARK = "fedssl::measured_step"


def _cpu_peak_from_profile(prof: profile) -> int:
    """Peak of the running sum of CPU alloc (+) / free (−) events inside the marked step, in time order."""
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == _STEP_MARK]
    if len(marks) != 1:
        raise RuntimeError(f"expected one '{_STEP_MARK}' range in the profile, found {len(marks)}")
    start, end = marks[0].start_ns(), marks[0].end_ns()
    memory = [
        e
        for e in events
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU and start <= e.start_ns() <= end
    ]
    running = peak = 0
    for event in sorted(memory, key=lambda e: e.start_ns()):
        running += event.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _cpu_peak_meter(
    modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None
) -> Iterator[Callable[[], int]]:
    """Measure the transient CPU peak of the enclosed code; yields a getter valid after exit."""
    result: dict[str, int] = {}
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _rehome_state(modules, optimizer)
        with record_function(_STEP_MARK):
            yield lambda: result["peak"]
    result["peak"] = _cpu_peak_from_profile(prof)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints start/stop lines users need not see."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _cuda_peak_meter(device: torch.device) -> Iterator[Callable[[], int]]:
    """Measure the transient CUDA peak (caching allocator's allocated bytes) of the enclosed code."""
    result: dict[str, int] = {}
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield lambda: result["peak"]
    torch.cuda.synchronize(device)
    result["peak"] = max(0, torch.cuda.max_memory_allocated(device) - before)


def measure_step(
    step: Callable[[], object],
    *,
    modules: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    images: int,
    device: torch.device | str = "cpu",
) -> StepCost:
    """Run ``step()`` ONCE under measurement and return its :class:`StepCost`.

    ``step`` must be a real training step (forward, backward, optimizer step);
    it changes the weights like any step. ``modules`` are every module the
    client holds (online, frozen and momentum parts): their parameters and
    buffers are ``param_bytes`` and are not counted as activations.
    ``images`` is the number of images the step processes (FLOPs are divided
    by it). Create the batch inside ``step`` if its memory should count.
    """
    if images <= 0:
        raise ValueError(f"images must be positive, got {images}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"measure_step supports cpu and cuda devices, got {device}")

    param_bytes = _held_bytes(_params_and_buffers(modules))
    held_before = param_bytes + _held_bytes(_grads(modules)) + _held_bytes(_optimizer_tensors(optimizer))
    meter = _SavedTensorMeter(excluded={t.untyped_storage().data_ptr() for t in _params_and_buffers(modules)})
    peak_meter = _cpu_peak_meter(modules, optimizer) if device.type == "cpu" else _cuda_peak_meter(device)

    with peak_meter as transient_peak:
        with flop_counter() as flops, torch.autograd.graph.saved_tensors_hooks(
            meter.pack, meter.unpack
        ):
            step()

    return StepCost(
        flops_per_image=flops.get_total_flops() / images,
        peak_bytes=transient_peak(),
        param_bytes=param_bytes,
        grad_bytes=_held_bytes(_grads(modules)),
        optimizer_bytes=_held_bytes(_optimizer_tensors(optimizer)),
        activation_bytes=meter.peak,
        held_before_bytes=held_before,
    )


# ---------------------------------------------------------------------------
# the ledger
# ---------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


@dataclass
class Ledger:
    """Per client and round: what a client held, computed and sent.

    One row per event: ``{"round", "client", "kind", **values}``. Rows of kind
    ``"upload"`` / ``"download"`` carry ``bytes``; rows of kind
    ``"step_cost"`` carry :meth:`StepCost.as_dict`.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, *, round: int, client: int, kind: str, **values: float | int) -> None:  # noqa: A002
        """Append one row; values must be finite numbers."""
        if not kind:
            raise ValueError("kind must be a non-empty string")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ledger value {name}={value!r} must be a finite number")
        self.rows.append({"round": int(round), "client": int(client), "kind": kind, **values})

    def record_step_cost(self, *, round: int, client: int, cost: StepCost) -> None:  # noqa: A002
        """Append a ``"step_cost"`` row holding every field of ``cost``."""
        self.record(round=round, client=client, kind=STEP_COST, **cost.as_dict())

    def clients(self) -> list[int]:
        """Every client that appears in any row, sorted; the server's rows (``SERVER_ID``) are not a client's."""
        return sorted({row["client"] for row in self.rows if row["client"] != SERVER_ID})

    def optimizer_steps(self) -> int:
        """Local optimizer steps over the run, summed over every client's uploads (0 where none are recorded)."""
        return int(sum(row.get("steps", 0) for row in self.rows if row["kind"] == UPLOAD))

    def bytes_per_client(self) -> dict[int, dict[str, int]]:
        """Total bytes each client uploaded and downloaded over the run: ``{client: {"up", "down"}}``."""
        totals = {client: {"up": 0, "down": 0} for client in self.clients()}
        direction = {UPLOAD: "up", DOWNLOAD: "down"}
        for row in self.rows:
            if row["kind"] in direction and row["client"] != SERVER_ID:
                totals[row["client"]][direction[row["kind"]]] += int(row["bytes"])
        return totals

    def _step_values(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.rows if row["kind"] == STEP_COST and name in row]

    def summary(self) -> dict[str, float]:
        """Per-client communication (mean / max over clients) and the memory / FLOP extremes."""
        per_client = list(self.bytes_per_client().values())
        up = [float(c["up"]) for c in per_client]
        down = [float(c["down"]) for c in per_client]
        both = [u + d for u, d in zip(up, down)]
        out: dict[str, float] = {
            "clients": float(len(per_client)),
            "up_bytes_mean": _mean(up),
            "up_bytes_max": max(up, default=0.0),
            "down_bytes_mean": _mean(down),
            "down_bytes_max": max(down, default=0.0),
            "comm_bytes_mean": _mean(both),
            "comm_bytes_max": max(both, default=0.0),
            "comm_bytes_total": float(sum(both)),
        }
        if any(row["kind"] == STEP_COST for row in self.rows):
            out.update(
                {
                    "peak_training_bytes_max": max(self._step_values("peak_training_bytes"), default=0.0),
                    "estimated_bytes_max": max(self._step_values("estimated_bytes"), default=0.0),
                    "activation_bytes_max": max(self._step_values("activation_bytes"), default=0.0),
                    "flops_per_image_mean": _mean(self._step_values("flops_per_image")),
                    "flops_per_image_max": max(self._step_values("flops_per_image"), default=0.0),
                }
            )
        return out

    def to_jsonl(self, path: Path) -> None:
        """Write one JSON object per row, atomically; nothing is written if a row cannot be serialised."""
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in self.rows)
        atomic_write_text(path, text)

    @classmethod
    def from_jsonl(cls, path: Path) -> Ledger:
        """Read a ledger written by :meth:`to_jsonl`."""
        rows: list[dict[str, Any]] = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise FedSSLError(f"cannot read ledger {path}: {err.strerror}; check the path") from err
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FedSSLError(f"ledger {path} line {number} is not valid JSON; delete the file or re-run") from err
            _check_row(row, f"ledger {path} line {number}")
            rows.append(row)
        return cls(rows)

    def state_dict(self) -> dict[str, Any]:
        """A copy of the rows, for checkpoints."""
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the rows by those of :meth:`state_dict` (validated)."""
        rows = state.get("rows") if isinstance(state, Mapping) else None
        if not isinstance(rows, list):
            raise CheckpointError("checkpoint ledger has no 'rows' list; the checkpoint is corrupt or from another version")
        for row in rows:
            _check_row(row, "checkpoint ledger")
        self.rows = [dict(row) for row in rows]


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict) or not {"round", "client", "kind"} <= row.keys():
        raise CheckpointError(f"{where}: a row lacks round/client/kind; the file is corrupt or from another version")


# ---------------------------------------------------------------------------
# human-readable numbers
# ---------------------------------------------------------------------------


def _human(n: float, base: float, units: Sequence[str]) -> str:
    value = float(n)
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.0f} {unit}" if unit == units[0] else f"{value:.1f} {unit}"
        value /= base
    return f"{value:.1f} {units[-1]}"


def human_bytes(n: float) -> str:
    """Binary units: ``human_bytes(1258291) == "1.2 MiB"``."""
    return _human(n, 1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


def human_flops(n: float) -> str:
    """Decimal units: ``human_flops(3.4e6) == "3.4 MFLOP"``."""
    return _human(n, 1000.0, ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"))
