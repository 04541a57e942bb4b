"""FedAvg weighting against a hand-written computation."""

from __future__ import annotations

import pytest
import torch

from fedssl.aggregation import weighted_average


def test_weighted_average_weights_by_data_size() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    out = weighted_average([a, b], [1, 3])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].item() == 5  # integer buffers are not averaged
    assert out["w"].dtype == torch.float32


def test_equal_weights_is_the_mean_and_inputs_are_untouched() -> None:
    states = [{"w": torch.full((3,), float(i))} for i in range(4)]
    out = weighted_average(states, [2, 2, 2, 2])
    torch.testing.assert_close(out["w"], torch.full((3,), 1.5))
    assert states[0]["w"].sum().item() == 0.0


def test_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [0])
    with pytest.raises(ValueError):
        weighted_average([], [])
