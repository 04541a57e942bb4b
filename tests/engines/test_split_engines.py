"""MocoSFL on both engines: ONE driver (``split_round``) over two exchanges gives the same numbers.

The in-process engine runs every client of a step in one stacked call; the Flower engine sends each
client its own forward / backward / sync / average messages and keeps its client-nets on its node.
Same seed and thread count: the same metrics, ledger, final accuracy and weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedssl.engines import start
from fedssl.engines.local import start_run
from tests.helpers import tiny_config

# 2 of 3 clients per step: the step's clients are drawn, and a client that sat a sync out fetches the nets
SPLIT_TINY = ("method=mocosfl", "threads=1", "clients=3", "rounds=2", "split.sync_every=2", "split.client_batch=2",
              "split.clients_per_step=0.67", "ssl.temperature=0.1", "model.blocks_per_stage=[1,1]",
              "eval.probe_epochs=1", "eval.every=0")
SAME = ("round", "loss", "clients", "images", "bytes_up", "bytes_down", "steps", "failed", "rejected", "knn_acc")


def _same(rows: list[dict]) -> list[dict]:
    return [{k: row[k] for k in SAME if k in row} for row in rows]


def _payload_rows(rows: list[dict]) -> list[dict]:
    """Ledger rows without what only a real exchange measures (the bytes of the messages on the wire)."""
    return [{k: v for k, v in row.items() if k != "wire_bytes"} for row in rows if row["kind"] in ("upload", "download")]


def test_mocosfl_gives_the_same_metrics_in_process_and_on_flower(tmp_path: Path) -> None:
    cfg = tiny_config(*SPLIT_TINY)
    local = start_run(cfg, tmp_path / "local")
    flower = start(cfg, tmp_path / "flower", engine="flower")
    assert _same(flower.metrics) == _same(local.metrics)
    assert flower.final == local.final
    assert _payload_rows(flower.ledger.rows) == _payload_rows(local.ledger.rows)
    fetched = [r for r in local.ledger.rows if r["kind"] == "download" and r["round"] == 1]
    assert len({r["weight_bytes"] for r in fetched}) == 2  # a client that sat the first sync out fetched the nets
    saved = [torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["method"]["server"]
             for run in ("local", "flower")]
    for key, value in saved[0]["encoder"].items():
        assert torch.equal(value, saved[1]["encoder"][key]), key
