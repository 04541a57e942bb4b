"""The run loop every engine shares: from the last checkpoint to the end, then the final evaluation.

An engine supplies a :class:`RoundRunner` (how a round reaches the clients: in this process, or
over Flower's Grid) and the :class:`Scoring` of the encoder; everything else (the baseline
evaluation, the kNN monitor, checkpoints, the run directory, the report) is here, once; so is the
fleet (``[devices]``): the memory budget checked before training, each round's simulated clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedssl.config import RunConfig
from fedssl.devices.fleet import Fleet, MeasuredStep, check_memory, fleet_of
from fedssl.devices.timeline import clock_columns, round_time
from fedssl.engines.federation import Federation
from fedssl.engines.observer import Observer
from fedssl.engines.steps import round_members
from fedssl.methods import build_method
from fedssl.methods.base import Method, MethodContext
from fedssl.methods.split import SplitMethod
from fedssl.report import finish_run
from fedssl.resources import REFERENCE_STEP_COST, STEP_COST, Ledger
from fedssl.run_dir import RunDir, RunOutcome, load_checkpoint, save_checkpoint, write_jsonl


class RoundRunner(Protocol):
    """How an engine runs the rounds of :func:`execute`: in this process, or over Flower's Grid."""

    def begin(self, method: Method, resumed: bool) -> None:
        """Before the first round this engine runs (a new run, or one resumed from its checkpoint)."""

    def run_round(self, method: Method, round_index: int, ledger: Ledger, observer: Observer) -> dict[str, Any]:
        """One round on the clients; its metrics row."""


Score = Callable[[Method, Federation, RunConfig, torch.device], Any]


@dataclass(frozen=True)
class Scoring:
    """How a run's encoder is scored: before the first round, by the monitor after rounds, at the end."""

    baseline: Score  # -> dict: the random-init encoder of the final architecture, and raw pixels
    monitor: Score  # -> float: the kNN monitor
    final: Score  # -> dict: the final encoder


def execute(cfg: RunConfig, run: RunDir, fed: Federation, device: torch.device, observer: Observer,
            runner: RoundRunner, scoring: Scoring) -> RunOutcome:
    """Run the experiment from its last checkpoint to the end and evaluate the final encoder.

    ``runner`` runs the rounds; everything else (evaluation, checkpoints, the run directory, the report)
    is the same for every engine.
    """
    with torch_threads(cfg.threads):
        return execute_rounds(cfg, run, fed, device, observer, runner, scoring)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (0 = leave it) for the enclosed code, then restored, so
    that a run started in-process (tests, comparisons, reliability checks) leaves its caller's setting alone."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute_rounds(cfg: RunConfig, run: RunDir, fed: Federation, device: torch.device, observer: Observer,
                   runner: RoundRunner, scoring: Scoring) -> RunOutcome:
    method = build_method(MethodContext(cfg, fed.train.info, device, server_data=fed.server_data()))
    fleet = fleet_of(cfg, len(fed.client_indices))
    checkpoint = load_checkpoint(run, cfg)
    if checkpoint is None:
        first_round, metrics, ledger = 0, [], Ledger(rows=[])
        if fleet is not None:  # a fleet's memory budget is checked before anything else is spent
            measure_client_costs(method, fed, ledger)
            check_memory(cfg, fleet, measured_step(method, cfg, fed, ledger), split=isinstance(method, SplitMethod))
        observer.message("evaluating the random-init encoder and raw pixels (kNN + linear probe) ...")
        initial = scoring.baseline(method, fed, cfg, device)
        if fleet is None:
            measure_client_costs(method, fed, ledger)
    else:
        method.load_state_dict(checkpoint["method"])
        first_round, metrics, initial = checkpoint["round"], checkpoint["metrics"], checkpoint["initial"]
        ledger = Ledger(rows=[])
        ledger.load_state_dict(checkpoint["ledger"])
        observer.message(f"resuming {run.path} after round {first_round}/{cfg.rounds}")
    runner.begin(method, resumed=checkpoint is not None)
    for r in range(first_round, cfg.rounds):
        if fleet is not None:
            measure_round_cost(method, fed, ledger, r)
        row = runner.run_round(method, r, ledger, observer)
        if fleet is not None:
            row.update(simulated_clock(method, cfg, fleet, ledger, r, metrics))
        method.write_round_figures(r, run.figures, fed.test)
        last = r + 1 == cfg.rounds
        if (cfg.eval.every and (r + 1) % cfg.eval.every == 0) or last:
            row["knn_acc"] = scoring.monitor(method, fed, cfg, device)
        metrics.append(row)
        observer.round_done(row)
        if (r + 1) % cfg.checkpoint_every == 0 or last:
            save_checkpoint(run, cfg, {"round": r + 1, "method": method.state_dict(), "metrics": metrics,
                                       "initial": initial, "ledger": ledger.state_dict()})
            write_jsonl(run.metrics, metrics)
            ledger.to_jsonl(run.ledger)
    observer.message("evaluating the final encoder (kNN + linear probe) ...")
    final = scoring.final(method, fed, cfg, device)
    outcome = RunOutcome(run, metrics, initial, final, ledger, fed.histogram())
    finish_run(outcome, cfg)
    return outcome


def measure_client_costs(method: Method, fed: Federation, ledger: Ledger) -> None:
    """One real measured step of the largest client, and of the method's reference if it has one."""
    client = _largest_client(fed)
    data = fed.client_data(client)
    ledger.record_step_cost(round=0, client=client, cost=method.measure_client_step(data))
    reference = method.reference_cost(data)
    if reference is not None:
        ledger.record(round=0, client=client, kind=REFERENCE_STEP_COST, payload_bytes=reference.payload_bytes,
                      **reference.cost.as_dict())


def measure_round_cost(method: Method, fed: Federation, ledger: Ledger, round_index: int) -> None:
    """The round's client step where it differs from the run's (a staged method's stage), for the clock."""
    client = _largest_client(fed)
    cost = method.round_step_cost(round_index, fed.client_data(client))
    if cost is not None:
        ledger.record_step_cost(round=round_index, client=client, cost=cost)


def measured_step(method: Method, cfg: RunConfig, fed: Federation, ledger: Ledger) -> MeasuredStep:
    """The measured client step (the ledger's ``step_cost`` row) and the batch setting it was measured at."""
    row = next(r for r in ledger.rows if r["kind"] == STEP_COST)
    if isinstance(method, SplitMethod):
        key, batch, smallest = "split.client_batch", method.split.client_batch, 1
    else:
        key, batch, smallest = "batch_size", min(cfg.batch_size, len(fed.client_indices[_largest_client(fed)])), 2
    return MeasuredStep(float(row["peak_training_bytes"]), float(row["held_before_bytes"]), key, batch, smallest)


def simulated_clock(method: Method, cfg: RunConfig, fleet: Fleet, ledger: Ledger, round_index: int,
                    metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The round's simulated seconds on the fleet (and the run's so far), from the ledger's rows of the round."""
    before = float(metrics[-1].get("sim_seconds_total", 0.0)) if metrics else 0.0
    members = None
    if isinstance(method, SplitMethod):
        members = [m.tolist() for m in round_members(cfg, method.split, round_index, method.num_clients)]
    return clock_columns(round_time(ledger.rows, fleet, round_index, members), fleet, before)


def _largest_client(fed: Federation) -> int:
    return int(np.argmax([len(ix) for ix in fed.client_indices]))
