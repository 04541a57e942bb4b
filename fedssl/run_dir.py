"""The run directory: resolved config, metrics, ledger, checkpoints, report.

Layout::

    RUN_DIR/config.toml          the resolved config (every default written out)
    RUN_DIR/metrics.jsonl        one JSON object per round
    RUN_DIR/ledger.jsonl         per client and round: bytes, memory, FLOPs
    RUN_DIR/checkpoints/last.pt  server state after the last completed round
    RUN_DIR/final.json           evaluation of the FINAL encoder
    RUN_DIR/report.md, plots/    the human-readable report
    RUN_DIR/figures/             the method's own figures (FedMAE: reconstructions at each stage's end)
    RUN_DIR/engine.json          the engine that made it (absent = in-process; written by the Flower engine)

Every file is written atomically; a failed run never overwrites another run's files.
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssl.config import RunConfig, config_hash, dumps_toml, make_config, to_dict
from fedssl.errors import CheckpointError, ConfigError, FedSSLError
from fedssl.io import atomic_torch_save, atomic_write_text
from fedssl.resources import Ledger

CHECKPOINT_FORMAT = 1
ENGINE_FILE = "engine.json"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def final(self) -> Path:
        return self.path / "final.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def figures(self) -> Path:
        """The method's own figures (FedMAE: reconstructions), written as the run goes."""
        return self.path / "figures"


def ensure_new_run_dir(path: str | Path) -> RunDir:
    """Refuse a path that already holds something (a failed run must never overwrite another)."""
    run = RunDir(Path(path))
    if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise FedSSLError(f"run directory {run.path} already exists and is not empty; "
                          f"continue it with --resume {run.path} or choose another --out")
    return run


@dataclass
class RunOutcome:
    """A finished run: its folder, per-round metrics, evaluations, ledger and the clients' class histogram."""

    run: RunDir
    metrics: list[dict[str, Any]]
    initial: dict[str, Any]
    final: dict[str, Any]
    ledger: Ledger
    histogram: np.ndarray  # (clients, classes)


def create_run_dir(path: str | Path, cfg: RunConfig) -> RunDir:
    """A new run directory holding the resolved config; refuses to reuse a non-empty one."""
    run = ensure_new_run_dir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config, dumps_toml(to_dict(cfg)))
    return run


def discard_unstarted(run: RunDir, also: Sequence[str] = ()) -> None:
    """Remove a run directory that :func:`create_run_dir` made and nothing has written to since (a run refused
    before its first round: e.g. a memory budget) but its config and the files named in ``also`` (what an engine
    writes before training: Flower's engine.json and log); anything else in it is left alone."""
    if run.checkpoint.exists():
        return
    for name in (run.config.name, *also):
        (run.path / name).unlink(missing_ok=True)
    for folder in sorted((p for p in run.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only empty folders
    with contextlib.suppress(OSError):
        run.path.rmdir()


def open_run_dir(path: str | Path) -> tuple[RunDir, RunConfig]:
    """An existing run directory and its config; a clear error when it is not one."""
    run = RunDir(Path(path))
    if not run.config.is_file():
        raise FedSSLError(f"{run.path} is not a fedssl run directory (no config.toml); "
                          "pass the folder that `fedssl run` wrote")
    try:
        values = tomllib.loads(run.config.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{run.config} is not valid TOML ({err}); restore it or start a new run") from None
    return run, make_config(values)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(run: RunDir, cfg: RunConfig, state: dict[str, Any]) -> None:
    """Atomically write the server state with the config digest it belongs to."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "config_hash": config_hash(cfg), **state}, run.checkpoint)


def load_checkpoint(run: RunDir, cfg: RunConfig) -> dict[str, Any] | None:
    """The last checkpoint, or None if the run never completed a round; rejects corrupt / foreign ones."""
    if not run.checkpoint.exists():
        return None
    try:
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint {run.checkpoint} is corrupt ({type(err).__name__}); "
                              "delete it to restart the run from scratch") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {run.checkpoint} is not a fedssl checkpoint of format "
                              f"{CHECKPOINT_FORMAT}; delete it to restart the run")
    if state.get("config_hash") != config_hash(cfg):
        raise CheckpointError(f"checkpoint {run.checkpoint} belongs to another config than {run.config}; "
                              "restore the original config.toml or start a new run with --out")
    return state


def read_engine(path: str | Path) -> dict[str, str]:
    """The engine that made a run directory: {"engine": "local"} or {"engine": "flower", "runtime": ...}."""
    file = Path(path) / ENGINE_FILE
    return json.loads(file.read_text()) if file.is_file() else {"engine": "local"}
