"""Resource accounting: exact bytes, FLOPs and memory of real steps; the ledger; atomic writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from fedssl.errors import CheckpointError
from fedssl.io import atomic_torch_save, atomic_write_text
from fedssl.resources import (
    Ledger,
    StepCost,
    human_bytes,
    human_flops,
    measure_step,
    payload_bytes,
    tensor_bytes,
)

# ---------------------------------------------------------------- bytes


def test_payload_bytes_exact_for_mixed_dtypes() -> None:
    payload = {
        "w": torch.zeros(3, 4),  # 12 x 4
        "h": torch.zeros(5, dtype=torch.float16),  # 5 x 2
        "i": torch.zeros(2, 2, dtype=torch.int64),  # 4 x 8
        "b": torch.zeros(7, dtype=torch.bool),  # 7 x 1
        "view": torch.zeros(10, 10)[:, 0],  # a strided view sends its 10 elements, not its base
    }
    expected = 48 + 10 + 32 + 7 + 40
    assert payload_bytes(payload) == expected
    assert payload_bytes(list(payload.values())) == expected
    assert tensor_bytes(payload["view"]) == 40


def test_payload_bytes_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="expected only tensors"):
        payload_bytes({"x": [1.0, 2.0]})  # type: ignore[dict-item]


# ---------------------------------------------------------------- measured steps


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> Callable[[], None]:
    """One real training step whose batch is created inside it (so its memory counts)."""

    def step() -> None:
        x, y = torch.randn(batch, 8), torch.randn(batch, 4)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    return step


def test_linear_flops_match_hand_count() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cost = measure_step(_sgd_step(model, optimizer, 32), modules=[model], optimizer=optimizer, images=32)
    # per image, a matmul in x out costs 2*in*out. Layer 1: forward + weight grad (its input needs no grad);
    # layer 2: forward + input grad + weight grad. Losses, ReLU and the SGD update count zero.
    assert cost.flops_per_image == 2 * 2 * 8 * 16 + 3 * 2 * 16 * 4


def test_conv_flops_match_hand_count() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        loss = model(torch.randn(5, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    cost = measure_step(step, modules=[model], optimizer=optimizer, images=5)
    conv_forward = 2 * (8 * 8 * 4) * (3 * 3 * 3)  # 2 x outputs x (in-channels x kernel)
    linear_forward = 2 * 256 * 2
    assert cost.flops_per_image == 2 * conv_forward + 3 * linear_forward


def test_activation_bytes_exact_and_linear_in_batch() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    costs = {b: measure_step(_sgd_step(model, optimizer, b), modules=[model], optimizer=optimizer, images=b)
             for b in (16, 64)}
    # saved for backward, float32: input x (8), ReLU output = layer-2 input (16, stored once), prediction
    # and target of the MSE (4 + 4). Weights are parameters, not activations.
    for batch, cost in costs.items():
        assert cost.activation_bytes == batch * (8 + 16 + 4 + 4) * 4


def test_frozen_forward_saves_no_activations() -> None:
    frozen, head = nn.Linear(8, 32), nn.Linear(32, 4)
    frozen.requires_grad_(False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)

    def step() -> None:
        with torch.no_grad():
            h = frozen(torch.randn(10, 8))
        optimizer.zero_grad()
        head(h).square().mean().backward()
        optimizer.step()

    cost = measure_step(step, modules=[frozen, head], optimizer=optimizer, images=10)
    assert cost.activation_bytes == 10 * (32 + 4) * 4  # head input and its output for the square
    assert cost.param_bytes == (8 * 32 + 32 + 32 * 4 + 4) * 4
    assert cost.grad_bytes == (32 * 4 + 4) * 4  # only trainable parameters get grads


def test_peak_bytes_positive_and_linear_in_batch() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _sgd_step(model, optimizer, 4)()  # grads exist before every measured step
    peaks = {
        b: measure_step(_sgd_step(model, optimizer, b), modules=[model], optimizer=optimizer, images=b)
        for b in (64, 128, 256, 512)
    }
    for cost in peaks.values():
        assert cost.peak_bytes >= cost.activation_bytes > 0
    slopes = [
        (peaks[b2].peak_bytes - peaks[b1].peak_bytes) / (b2 - b1) for b1, b2 in ((64, 128), (128, 256), (256, 512))
    ]
    assert min(slopes) > 0
    assert max(slopes) <= 1.1 * min(slopes)  # the batch-dependent part grows linearly


def test_peak_sees_grads_freed_by_zero_grad() -> None:
    """Grads allocated before the step and dropped by zero_grad() must not count twice."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _sgd_step(model, optimizer, 64)
    step()  # grads allocated outside any profiler: the allocator cannot report their free by itself
    with_grads = measure_step(step, modules=[model], optimizer=optimizer, images=64)
    optimizer.zero_grad(set_to_none=True)
    without_grads = measure_step(step, modules=[model], optimizer=optimizer, images=64)
    assert with_grads.held_before_bytes == without_grads.held_before_bytes + with_grads.grad_bytes
    assert with_grads.peak_training_bytes == without_grads.peak_training_bytes


def test_peak_ignores_memory_left_over_from_an_earlier_measured_step() -> None:
    """A block allocated while an earlier step was measured, freed in this one, is not this step's memory: the
    peak of a step must not depend on what the process measured before it."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _sgd_step(model, optimizer, 64)
    step()
    fresh = measure_step(step, modules=[model], optimizer=optimizer, images=64)
    leftover: list[torch.Tensor] = []
    measure_step(lambda: leftover.append(torch.ones(100_000)), modules=[model], optimizer=None, images=1)

    def step_freeing_the_leftover() -> None:
        leftover.clear()  # 400 kB allocated under the earlier measurement, freed here
        step()

    after = measure_step(step_freeing_the_leftover, modules=[model], optimizer=optimizer, images=64)
    assert after.peak_bytes == fresh.peak_bytes


@pytest.mark.parametrize(
    ("make_optimizer", "state_per_param"),
    [
        (lambda params: torch.optim.SGD(params, lr=0.1), 0),
        (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), 1),
        (lambda params: torch.optim.Adam(params, lr=1e-3), 2),
    ],
)
def test_optimizer_state_bytes(make_optimizer: Callable, state_per_param: int) -> None:
    model = _mlp()
    optimizer = make_optimizer(model.parameters())
    cost = measure_step(_sgd_step(model, optimizer, 8), modules=[model], optimizer=optimizer, images=8)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    scalar_steps = 4 * len(list(model.parameters())) if isinstance(optimizer, torch.optim.Adam) else 0
    assert cost.param_bytes == param_bytes
    assert cost.grad_bytes == param_bytes
    assert cost.optimizer_bytes == state_per_param * param_bytes + scalar_steps  # Adam: + a float32 step each
    assert cost.estimated_bytes == cost.param_bytes + cost.grad_bytes + cost.optimizer_bytes + cost.activation_bytes
    # first step: nothing but the parameters was held before; grads and state appear inside the step
    assert cost.held_before_bytes == param_bytes
    assert cost.peak_training_bytes >= param_bytes + cost.grad_bytes + cost.optimizer_bytes


def test_momentum_copies_count_once_and_tied_weights_once() -> None:
    online = _mlp()
    momentum = _mlp().requires_grad_(False)
    tied = nn.Linear(4, 4)
    alias = nn.Module()
    alias.weight = tied.weight  # the same Parameter held by two modules
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    cost = measure_step(
        _sgd_step(online, optimizer, 8), modules=[online, momentum, tied, alias], optimizer=optimizer, images=8
    )
    mlp_bytes = sum(p.numel() * 4 for p in online.parameters())
    assert cost.param_bytes == 2 * mlp_bytes + (16 + 4) * 4


@pytest.mark.cuda
def test_measure_step_on_cuda_matches_cpu_counts() -> None:
    costs = {}
    for device in ("cpu", "cuda"):
        model = _mlp().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            x, y = torch.randn(64, 8, device=device), torch.randn(64, 4, device=device)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

        costs[device] = measure_step(step, modules=[model], optimizer=optimizer, images=64, device=device)
    assert costs["cuda"].flops_per_image == costs["cpu"].flops_per_image
    assert costs["cuda"].activation_bytes == costs["cpu"].activation_bytes
    assert costs["cuda"].peak_bytes >= costs["cuda"].activation_bytes > 0


def test_measure_step_rejects_bad_arguments() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="images"):
        measure_step(lambda: None, modules=[model], optimizer=None, images=0)
    with pytest.raises(ValueError, match="cpu and cuda"):
        measure_step(lambda: None, modules=[model], optimizer=None, images=1, device="meta")


# ---------------------------------------------------------------- ledger


def _cost(peak: int, flops: float) -> StepCost:
    return StepCost(
        flops_per_image=flops, peak_bytes=peak, param_bytes=100, grad_bytes=100, optimizer_bytes=0,
        activation_bytes=50, held_before_bytes=100,
    )


def _ledger() -> Ledger:
    ledger = Ledger([])
    for rnd in range(2):
        for client in (0, 1):
            ledger.record(round=rnd, client=client, kind="download", bytes=1000)
            ledger.record(round=rnd, client=client, kind="upload", bytes=100 * (client + 1))
    ledger.record(round=0, client=2, kind="download", bytes=1000)  # joined, never uploaded
    ledger.record_step_cost(round=0, client=0, cost=_cost(peak=400, flops=10.0))
    ledger.record_step_cost(round=1, client=1, cost=_cost(peak=900, flops=30.0))
    return ledger


def test_ledger_bytes_per_client_and_summary() -> None:
    ledger = _ledger()
    assert ledger.bytes_per_client() == {
        0: {"up": 200, "down": 2000},
        1: {"up": 400, "down": 2000},
        2: {"up": 0, "down": 1000},
    }
    summary = ledger.summary()
    assert summary["clients"] == 3
    assert summary["up_bytes_mean"] == pytest.approx(200.0)
    assert summary["up_bytes_max"] == 400
    assert summary["down_bytes_mean"] == pytest.approx(5000 / 3)
    assert summary["comm_bytes_max"] == 2400
    assert summary["comm_bytes_total"] == 2200 + 2400 + 1000
    assert summary["peak_training_bytes_max"] == 100 + 900
    assert summary["flops_per_image_mean"] == pytest.approx(20.0)
    assert summary["estimated_bytes_max"] == 100 + 100 + 0 + 50


def test_ledger_summary_without_step_costs() -> None:
    ledger = Ledger([])
    ledger.record(round=0, client=0, kind="upload", bytes=5)
    assert "peak_training_bytes_max" not in ledger.summary()
    assert Ledger([]).summary()["comm_bytes_total"] == 0.0


def test_ledger_rejects_non_numeric_values() -> None:
    ledger = Ledger([])
    with pytest.raises(ValueError, match="finite number"):
        ledger.record(round=0, client=0, kind="upload", bytes=float("nan"))
    with pytest.raises(ValueError, match="finite number"):
        ledger.record(round=0, client=0, kind="upload", bytes="12")  # type: ignore[arg-type]


def test_ledger_jsonl_and_state_dict_round_trip(tmp_path: Path) -> None:
    ledger = _ledger()
    path = tmp_path / "ledger.jsonl"
    ledger.to_jsonl(path)
    assert len(path.read_text().splitlines()) == len(ledger.rows)
    assert Ledger.from_jsonl(path).rows == ledger.rows

    restored = Ledger([])
    restored.load_state_dict(ledger.state_dict())
    assert restored.rows == ledger.rows
    restored.record(round=9, client=9, kind="upload", bytes=1)
    assert len(ledger.rows) == len(restored.rows) - 1  # the state dict is a copy
    with pytest.raises(CheckpointError):
        restored.load_state_dict({"rows": [{"round": 0}]})


def test_ledger_from_corrupt_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"round": 0, "client": 0, "kind": "upload", "bytes": 1}\n{"round": 0, "cli')
    with pytest.raises(Exception, match="line 2"):
        Ledger.from_jsonl(path)


def test_failed_serialisation_keeps_target_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _ledger().to_jsonl(path)
    before = path.read_bytes()

    broken = _ledger()
    broken.rows.append({"round": 0, "client": 0, "kind": "x", "bytes": object()})  # not JSON
    with pytest.raises(TypeError):
        broken.to_jsonl(path)
    assert path.read_bytes() == before

    ckpt = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": torch.ones(2)}, ckpt)
    with pytest.raises(Exception):  # a lambda cannot be pickled: fails half-way through writing
        atomic_torch_save({"a": torch.ones(2), "f": lambda: 0}, ckpt)
    assert torch.equal(torch.load(ckpt)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ledger.jsonl"]


def test_atomic_write_text_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write_text(path, json.dumps({"x": 1}))
    atomic_write_text(path, json.dumps({"x": 2}))
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


# ---------------------------------------------------------------- human-readable


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (1.2 * 2**20, "1.2 MiB"), (3 * 2**30, "3.0 GiB")]
)
def test_human_bytes(n: float, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [(999, "999 FLOP"), (3.4e6, "3.4 MFLOP"), (5.86e11, "586.0 GFLOP")])
def test_human_flops(n: float, text: str) -> None:
    assert human_flops(n) == text
