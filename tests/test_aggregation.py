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


def test_server_momentum_is_fedavgm_and_plain_fedavg_at_zero() -> None:
    from fedssl.aggregation import ServerMomentum

    current = {"w": torch.zeros(3), "count": torch.tensor(1)}
    first = {"w": torch.ones(3), "count": torch.tensor(2)}
    assert ServerMomentum(0.0, 1.0).step(current, first) is first  # beta 0, lr 1: the average itself
    server = ServerMomentum(0.9, 1.0)
    after = server.step(current, first)
    assert torch.equal(after["w"], torch.ones(3)) and int(after["count"]) == 2  # v = delta on the first step
    again = server.step(after, {"w": after["w"] + 1, "count": torch.tensor(3)})
    assert torch.allclose(again["w"], torch.full((3,), 2.9))  # v = 0.9 * 1 + 1, added to 1
    resumed = ServerMomentum(0.9, 1.0)
    resumed.load_state_dict(server.state_dict())  # the velocity is server state: a resumed run continues it
    step = {"w": again["w"] - 0.5, "count": torch.tensor(3)}
    assert torch.equal(resumed.step(again, step)["w"], server.step(again, step)["w"])
    assert torch.allclose(ServerMomentum(0.0, 2.0).step(current, first)["w"], torch.full((3,), 2.0))  # server lr
