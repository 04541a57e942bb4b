"""Runs on Flower: in its simulation runtime (``fedssl run --engine flower``) or a deployment (``flwr run .``).

Both drive the run loop of the in-process engine (``fedssl.engines.loop.execute``:
evaluation, checkpoints, the run directory, the report) with a
:class:`~fedssl.engines.flower.server.FlowerRunner`, so a Flower run's folder is an
ordinary run directory (``fedssl eval / export / report`` read it) plus:

- ``engine.json``: which engine and runtime made it (``fedssl run --resume`` continues
  it on the same one), and the Ray cluster a simulation ran on (``flower.ray_address``);
- ``flower.log``: the server's log: which node holds which client and where it read its
  data, every failed or rejected client with the reason, Flower's own messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from fedssl.config import RunConfig, load_toml, make_config
from fedssl.devices.fleet import BudgetError
from fedssl.engines.federation import Federation, load_federation, resolve_device
from fedssl.engines.flower.cluster import cluster_nodes, describe, silence_gpu_notice, simulation_backend
from fedssl.engines.flower.server import FlowerRunner, check_flower_config, num_partitions
from fedssl.engines.local import SCORING
from fedssl.engines.loop import execute
from fedssl.engines.observer import Observer
from fedssl.errors import ConfigError, FedSSLError
from fedssl.io import atomic_write_text
from fedssl.methods import METHODS
from fedssl.run_dir import (ENGINE_FILE, RunDir, RunOutcome, create_run_dir, discard_unstarted, ensure_new_run_dir,
                             open_run_dir)

LOG_FILE = "flower.log"
APP_ROOT = Path(__file__).resolve().parents[3]  # the Flower app's folder (pyproject.toml, configs/)

log = logging.getLogger("fedssl")


def write_engine(run: RunDir, runtime: str, cluster: Mapping[str, Any] | None = None) -> None:
    """Record in the run directory that Flower runs it, how (``simulation`` or ``deployment``), and on which Ray
    cluster (``ray``: its address and nodes; absent: a Ray instance Flower started on this machine)."""
    record: dict[str, Any] = {"engine": "flower", "runtime": runtime}
    if cluster:
        record["ray"] = dict(cluster)
    atomic_write_text(run.path / ENGINE_FILE, json.dumps(record) + "\n")


@contextlib.contextmanager
def run_log(run: RunDir) -> Iterator[None]:
    """fedssl's and Flower's log lines into RUN_DIR/flower.log; Flower's console quiet but for errors."""
    from flwr.supercore.logger import console_handler

    handler = logging.FileHandler(run.path / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger("fedssl"), logging.getLogger("flwr")]
    levels = [lg.level for lg in loggers]
    console_level = console_handler.level
    for lg in loggers:
        lg.addHandler(handler)
    loggers[0].setLevel(logging.INFO)
    console_handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        console_handler.setLevel(console_level)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def execute_on_grid(grid: Any, cfg: RunConfig, run: RunDir, observer: Observer,
                    fed: Federation | None = None) -> RunOutcome:
    """The run (from its last checkpoint) with its rounds sent through ``grid``: what every ServerApp does.

    The server holds the labelled splits for evaluation (kNN monitor, linear probe), as in-process.
    """
    device = resolve_device(cfg.device)
    fed = fed or load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    return execute(cfg, run, fed, device, observer, FlowerRunner(grid, cfg, observer), SCORING)


# ------------------------------------------------------------------ simulation (fedssl run --engine flower)


def start_simulation(cfg: RunConfig, path: str | Path, *, observer: Observer) -> RunOutcome:
    """A new run in Flower's simulation runtime: one virtual SuperNode per client."""
    check_flower_config(cfg)
    ensure_new_run_dir(path)
    resolve_device(cfg.device)
    cluster = cluster_nodes(cfg)  # like the data, checked before the run directory exists
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    run = create_run_dir(path, cfg)
    write_engine(run, "simulation", cluster)
    try:
        return simulate(cfg, run, observer=observer, fed=fed, cluster=cluster)
    except BudgetError:
        discard_unstarted(run, also=(ENGINE_FILE, LOG_FILE))  # refused before training, as in-process: no run directory
        raise


def resume_simulation(path: str | Path, *, observer: Observer) -> RunOutcome:
    """Continue a simulation run; ``engine.json`` then names the cluster it continues on (which may be another)."""
    run, cfg = open_run_dir(path)
    cluster = cluster_nodes(cfg)
    write_engine(run, "simulation", cluster)
    return simulate(cfg, run, observer=observer, cluster=cluster)


def simulate(cfg: RunConfig, run: RunDir, *, observer: Observer, fed: Federation | None = None,
             cluster: Mapping[str, Any] | None = None) -> RunOutcome:
    """Run (or continue) ``run`` with Flower's simulation runtime; the ServerApp runs in this process."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedssl.engines.flower.client_app import app as client_app

    check_flower_config(cfg)
    done: dict[str, RunOutcome] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        try:
            done["outcome"] = execute_on_grid(grid, cfg, run, observer, fed)
        except FedSSLError as error:  # e.g. a memory budget: the user's one line, not Flower's log of a crash
            done["error"] = error

    silence_gpu_notice()
    with run_log(run):
        log.info(describe(dict(cluster or {})))
        run_simulation(server_app=server, client_app=client_app, num_supernodes=num_partitions(cfg),
                       backend_config=simulation_backend(cfg))  # type: ignore[arg-type]
    if "error" in done:
        raise done["error"]
    if "outcome" not in done:
        raise FedSSLError(f"the Flower simulation stopped before the run finished; see {run.path / LOG_FILE} and "
                          f"continue with fedssl run --resume {run.path}")
    return done["outcome"]


# ------------------------------------------------------------------ deployment (flwr run . <federation>)


def app_path(value: str) -> Path:
    """A path from the app's run config: absolute, relative to the working folder, or to the app's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return APP_ROOT / path


def overrides(text: str) -> list[str]:
    """``"clients=2; rounds=3"`` -> ``["clients=2", "rounds=3"]`` (the run config's ``set``)."""
    return [item.strip() for item in text.split(";") if item.strip()]


def job_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, RunDir]:
    """The run a ServerApp must run, from ``[tool.flwr.app.config]`` + ``flwr run --run-config``.

    ``resume``: a run directory to continue; else ``config`` (a preset, "" = defaults) with ``set``
    overrides, written to ``out`` (default ``runs/<method>-<dataset>-<time>`` under the ServerApp's
    working folder).
    """
    known = {"config", "set", "out", "resume"}
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(f"unknown run config key(s) {unknown}; the fedssl app takes {sorted(known)}")
    resume = str(run_config.get("resume", ""))
    if resume:
        if run_config.get("config") or run_config.get("set") or run_config.get("out"):
            raise ConfigError("resume continues a run with its own config.toml; drop config / set / out")
        run, cfg = open_run_dir(app_path(resume))
        return cfg, run
    preset = str(run_config.get("config", ""))
    cfg = make_config(load_toml(app_path(preset)) if preset else {}, overrides(str(run_config.get("set", ""))))
    check_flower_config(cfg)
    out = str(run_config.get("out", "")) or f"runs/{cfg.method}-{cfg.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    ensure_new_run_dir(out)
    return cfg, create_run_dir(out, cfg)


class LogObserver:
    """A deployment's ServerApp has no terminal: one log line per event (RUN_DIR/flower.log and ``flwr log``)."""

    def round_started(self, round_index: int, num_clients: int) -> None:
        log.info("round %d: %d client(s) sampled", round_index + 1, num_clients)

    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None:
        knn = f" knn={row['knn_acc']:.4f}" if row.get("knn_acc") is not None else ""
        text = (f"round {row['round']} done: loss={row['loss']:.4f} failed={row.get('failed', 0)} "
                f"rejected={row.get('rejected', 0)} bytes up/down={row['bytes_up']}/{row['bytes_down']} "
                f"wire up/down={row.get('wire_up', 0)}/{row.get('wire_down', 0)}{knn}")
        log.info(text)
        print(text, flush=True)

    def message(self, text: str) -> None:
        log.info(text)
        print(text, flush=True)


def serve(grid: Any, run_config: Mapping[str, Any]) -> RunOutcome:
    """The deployment ServerApp's whole job (``server_app.main``)."""
    cfg, run = job_from_run_config(run_config)
    write_engine(run, "deployment")
    with run_log(run):
        log.info("fedssl %s on %s: %d clients, %d rounds -> %s", cfg.method, cfg.dataset, cfg.clients, cfg.rounds,
                 run.path.resolve())
        outcome = execute_on_grid(grid, cfg, run, LogObserver())
        log.info("finished: final kNN %s, report %s", outcome.final.get("knn_acc"), run.report.resolve())
    return outcome
