"""Memory of one real training step, measured: what a client holds, its transient peak, what autograd saves.

The allocator's own alloc/free events during the step (CPU: the PyTorch profiler's ``[memory]`` events;
CUDA: the caching allocator's peak statistic), plus the bytes autograd saved for backward, and the
step's FLOPs (``fedssl.resources.flops``): :func:`measure_step` -> :class:`StepCost`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch._C._profiler import _EventType, _ProfilerEvent  # the profiler's event tree: allocations with addresses
from torch.profiler import ProfilerActivity, profile, record_function

from fedssl.resources.flops import flop_counter

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


@dataclass(frozen=True)
class StepCost:
    """Cost of one real training step of one client (all sizes in bytes).

    ``peak_bytes`` is the transient high-water mark: the largest value, during
    the step, of (bytes allocated since the step began − bytes freed since the
    step began). It holds activations, temporaries, the batch if the step
    creates it, and grads / optimizer state the step creates; the client's own
    memory freed in the step (grads dropped by ``zero_grad()``, optimizer state
    replaced) lowers it, and nothing else the process frees meanwhile does, so
    the figure does not depend on what the process ran before the step.
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


def _profile_events(prof: profile) -> list[_ProfilerEvent]:
    """Every event of the profile (all threads, ops and allocations), in time order; events of one instant
    keep the tree's pre-order (an op before the allocations inside it, siblings in the order they ran)."""
    events, stack = [], list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:
        event = stack.pop()
        events.append(event)
        stack.extend(reversed(event.children))
    return sorted(events, key=lambda e: e.start_time_ns)  # stable


def _cpu_peak_from_profile(prof: profile) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (−) inside the marked step, in time order.

    A free counts only when its block was allocated under this profile: the allocator also reports frees of
    blocks allocated while an *earlier* profile ran (it remembers their sizes), which would make a step's
    peak depend on what the process measured before it. Blocks are matched by address.
    """
    events = _profile_events(prof)
    marks = [e for e in events if e.name == _STEP_MARK]
    if len(marks) != 1:
        raise RuntimeError(f"expected one '{_STEP_MARK}' range in the profile, found {len(marks)}")
    start, end = marks[0].start_time_ns, marks[0].end_time_ns
    live: set[int] = set()  # addresses of blocks allocated under this profile and not yet freed
    running = peak = 0
    for event in events:
        if event.tag != _EventType.Allocation or event.extra_fields.device.type != "cpu":
            continue
        ptr, size = event.extra_fields.ptr, event.extra_fields.alloc_size
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.remove(ptr)
        else:
            continue  # allocated before this profile began
        if start <= event.start_time_ns <= end:
            running += size
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
