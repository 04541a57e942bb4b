"""Shared by the tests: tiny, fast configurations (a handful of steps on a narrow net), and real runs killed
by SIGKILL and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedssl.cli import main
from fedssl.config import RunConfig, dumps_toml, make_config, to_dict
from fedssl.engines.local import start_run
from fedssl.resources import REFERENCE_STEP_COST, SERVER_STEP_COST, STEP_COST, Ledger
from fedssl.run_dir import RunDir, open_run_dir, read_jsonl

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "clients": 3,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 16,
    "partition": "iid",
    "model": {"width": 8, "blocks_per_stage": [1, 1, 1, 1]},
    "ssl": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 64},
    "eval": {"probe_epochs": 5, "knn_k": 20},
}


def tiny_config(*overrides: str, **top: Any) -> RunConfig:
    """The tiny synthetic config with ``--set``-style overrides."""
    return make_config(TINY, list(overrides), **top)


def tiny_args(*extra: str) -> list[str]:
    """The same tiny config as ``--set`` arguments for the CLI."""
    args = [f"--set=dataset={TINY['dataset']}", "--set=clients=3", "--set=rounds=2", "--set=local_steps=2",
            "--set=batch_size=16", "--set=partition=iid", "--set=model.width=8",
            "--set=model.blocks_per_stage=[1,1,1,1]", "--set=ssl.proj_hidden=32", "--set=ssl.proj_dim=16",
            "--set=ssl.queue_size=64", "--set=eval.probe_epochs=5", "--set=eval.knn_k=20"]
    return args + list(extra)


# ------------------------------------------------------------------ killed and resumed runs

TIMING_KEYS = frozenset({"seconds", "images_per_s", "step_seconds", "forward_seconds", "backward_seconds",
                         "client_seconds", "sync_seconds"})  # wall-clock figures: all two runs may differ in
MEASURED_KINDS = frozenset({STEP_COST, SERVER_STEP_COST, REFERENCE_STEP_COST})  # measured memory / time


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows without their timing keys."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def traffic(ledger: Ledger) -> list[dict[str, Any]]:
    """The ledger's rows of what crossed the wire (bytes per client and round), not the measured step costs."""
    return [row for row in ledger.rows if row["kind"] not in MEASURED_KINDS]


def fedssl_env() -> dict[str, str]:
    """The environment of a `fedssl` subprocess: this one, with this checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def kill_run(cfg: RunConfig, out: Path, *, before_first_checkpoint: bool = False, timeout_s: float = 240.0) -> int:
    """Run `fedssl run` on ``cfg`` as a real process and SIGKILL it as soon as its first checkpoint exists (or,
    ``before_first_checkpoint``, as soon as its run directory does: its data is loaded, no round is done).

    Returns the rounds its last checkpoint holds (0: none), fewer than ``cfg.rounds``. Pin ``cfg.threads`` so
    that this process and the caller's sum floats in the same order.
    """
    config = out.with_name(out.name + ".toml")
    config.write_text(dumps_toml(to_dict(cfg)))
    run = RunDir(out)
    signal_file = run.config if before_first_checkpoint else run.checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "run", "--config", str(config), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=fedssl_env())
    try:
        deadline = time.monotonic() + timeout_s
        while not signal_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=30)
    assert signal_file.exists(), f"{signal_file.name} was never written: {err.decode()[-2000:]}"
    assert not run.final.exists(), "the run ended before it could be killed"
    done = int(torch.load(run.checkpoint, weights_only=True)["round"]) if run.checkpoint.exists() else 0
    assert done < cfg.rounds and (done >= 1 or before_first_checkpoint), done
    return done


def run_files(path: Path) -> dict[str, Any]:
    """What a finished run directory says, less wall-clock figures and measured step costs: the metrics of every
    round, the initial and final evaluations, the class histogram and the traffic in the ledger."""
    run = RunDir(path)
    final = json.loads(run.final.read_text())
    return {"metrics": comparable(read_jsonl(run.metrics)), "initial": final["initial"], "final": final["final"],
            "histogram": final["histogram"], "traffic": traffic(Ledger.from_jsonl(run.ledger))}


def assert_resume_is_exact(cfg: RunConfig, tmp_path: Path, *, before_first_checkpoint: bool = False) -> int:
    """``cfg`` killed by SIGKILL (see :func:`kill_run`) and continued by `fedssl run --resume` ends with exactly
    the files of the same config (read back from the killed run's config.toml) run without interruption.
    Returns the rounds the killed run had done."""
    killed, full = tmp_path / "killed", tmp_path / "full"
    done = kill_run(cfg, killed, before_first_checkpoint=before_first_checkpoint)
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    start_run(open_run_dir(killed)[1], full)
    assert run_files(killed) == run_files(full)
    return done


def sleep_task(seconds: float, root: Path) -> None:
    """A task of :func:`fedssl.run_pool.run_in_processes` that only waits (module level: a spawned worker
    imports it)."""
    time.sleep(seconds)


# ---------------------------------------------------------------- processes the tests start (Linux: read from /proc)

def child_pids() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, every process on the machine (zombies included)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on."""
    tree, out, todo = child_pids(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's exit is reaped by whoever adopted it, maybe never here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it is gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""
