"""Tiny, fast configurations shared by the tests (a handful of steps on a narrow net)."""

from __future__ import annotations

from typing import Any

from fedssl.config import RunConfig, make_config

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
