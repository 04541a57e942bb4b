"""The gpu-paper comparison end to end, at tiny sizes, through the very command a GPU runs.

``fedssl bench compare --preset gpu-paper`` builds the preset's own grid; ``--set`` extras (applied last to
every setting, so they win over the families' and the methods' values) shrink data, nets, rounds, steps and
evaluation; ``--only`` keeps the ceilings and one run of every federated method of the headline group. So the
first run on a GPU meets configs, method code, fine-tuning and the results page that have all run here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedssl.cli import main
from fedssl.compare import COMPARE_PRESETS, build_grid, select_settings

PRESET = COMPARE_PRESETS["gpu-paper"]
SLICE = ("centralized-*-s0", "*-dirichlet-0-5-10c-s0")  # the ceilings and the headline group, seed 0
TINY = ("dataset=synthetic", "download=false", "image_size=16", "threads=1",
        "rounds=2", "layerwise.rounds_per_stage=1", "local_steps=1", "batch_size=16",
        "model.width=12", "model.heads=3", "model.depth=2", "model.group_channels=4",
        "model.blocks_per_stage=[1,1,1,1]", "ssl.proj_hidden=32", "ssl.proj_dim=16", "ssl.queue_size=64",
        "split.sync_every=2", "calibration.steps=1", "mae.decoder_width=16", "mae.decoder_heads=2",
        "mae.pictures=0", "eval.every=0", "eval.probe_epochs=1", "eval.knn_k=20", "eval.batch_size=128",
        "eval.finetune_epochs=1", "eval.finetune_batch_size=64")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gpu_paper_runs_end_to_end_at_tiny_sizes(device: str, tmp_path: Path) -> None:
    extras = (*TINY, f"device={device}")
    settings = select_settings(build_grid(PRESET, extras), SLICE)
    assert [s.label for s in settings] == ([m.label for m in PRESET.methods if not m.federated]
                                           + [m.label for m in PRESET.methods if m.federated])
    assert {s.group for s in settings} == {"pooled data", PRESET.headline} and all(s.finetune for s in settings)
    for setting in settings:  # the extras win over the family's (width 64 / 192) and the method's (FedMAE) keys
        cfg = setting.config()
        assert (cfg.dataset, cfg.device, cfg.rounds, cfg.model.width, cfg.mae.decoder_width, cfg.seed) == \
            ("synthetic", device, 2, 12, 16, 0)

    runs, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["bench", "compare", "--preset", "gpu-paper", *(a for p in SLICE for a in ("--only", p)),
            *(a for e in extras for a in ("--set", e)), "--runs", str(runs), "--docs", str(docs), "--no-reliability"]
    assert main(argv) == 0

    rows = json.loads((runs / "rows.json").read_text())
    assert [r["key"] for r in rows] == [s.key for s in settings]
    for row in rows:
        assert row["rounds"] == 2 and 0 <= row["knn"] <= 1 and 0 <= row["finetune"] <= 1 and row["memory"] > 0
    sfl = next(r for r in rows if r["label"] == "MocoSFL-1 (cut 1)")
    assert sfl["image_steps"] == 2 * 2 * 10 * 10  # 2 rounds of sync_every 2 steps, 10 clients x auto-adjusted 10
    page = (docs / "RESULTS.md").read_text()
    assert "| fine-tune |" in page and "Preset `gpu-paper`" in page and "--only 'centralized-*-s0'" in page
    assert all(f"| {s.label} |" in page for s in settings)
    assert (docs / "results" / "accuracy-vs-memory.png").is_file()
