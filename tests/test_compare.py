"""Comparisons: the grid of a preset, resumable runs read back from their files, the results page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedssl.compare import COMPARE_PRESETS, Setting, build_grid, ensure_run, run_comparison, summarize_run
from fedssl.errors import FedSSLError
from fedssl.reliability import check_bad_configs
from fedssl.results_page import fold_seeds, pareto_front, render_results_page
from tests.helpers import TINY


def test_grids_cover_every_method_partition_and_client_count() -> None:
    small = build_grid(COMPARE_PRESETS["cpu-small"], ["data_dir=/data"])
    keys = [s.key for s in small]
    assert len(keys) == len(set(keys)) == 68  # 10 federated methods x 3 partitions x 2 counts + MocoSFL x 2 at 1,000 + 2 ceilings
    labels = {s.label for s in small}
    assert {"FedMoCo v2", "FedMoCo v3 (ViT, end-to-end)", "FedSimCLR", "FedBYOL", "MocoSFL-1 (cut 1)",
            "MocoSFL-3 (cut 2)", "LW-FedSSL", "LW-FedSSL full (calibration + alignment)", "Prog-FedSSL",
            "FedMAE (stage-wise)", "centralized MoCo v2 (ceiling)"} <= labels
    groups = {s.group for s in small if s.label == "MocoSFL-1 (cut 1)"}
    assert "2 classes per client, 1,000 clients" in groups and len(groups) == 9
    for setting in small:  # every config is valid
        cfg = setting.config()
        assert cfg.data_dir == "/data" and cfg.seed == 0
    paper = build_grid(COMPARE_PRESETS["gpu-paper"])
    assert len(paper) == 3 * 68 and {s.config().seed for s in paper} == {0, 1, 2}
    assert all(s.finetune for s in paper)


def _setting(key: str = "a", *extra: str) -> Setting:
    return Setting(key, "FedMoCo", TINY, ("rounds=2", "local_steps=1", "eval.probe_epochs=2", *extra),
                   group="IID, 3 clients")


def test_an_interrupted_run_is_resumed_and_a_finished_one_read_back(tmp_path: Path) -> None:
    setting = _setting()
    path = ensure_run(setting, tmp_path)
    first = summarize_run(path)
    assert first["method"] == "fedmoco" and 0 <= first["knn"] <= 1 and first["comm"] > 0 and first["memory"] > 0
    stamp = (path / "final.json").stat().st_mtime_ns
    assert summarize_run(ensure_run(setting, tmp_path)) == first  # read back, not rerun
    assert (path / "final.json").stat().st_mtime_ns == stamp
    (path / "final.json").unlink()  # as if killed during the final evaluation
    resumed = summarize_run(ensure_run(setting, tmp_path))
    assert resumed["knn"] == first["knn"] and resumed["probe"] == first["probe"]
    with pytest.raises(FedSSLError, match="another config"):
        ensure_run(_setting("a", "lr=0.01"), tmp_path)
    with pytest.raises(FedSSLError, match="unique key"):
        run_comparison([_setting("b"), _setting("b")], tmp_path)


def test_seeds_fold_into_mean_and_spread_and_the_page_renders(tmp_path: Path) -> None:
    rows = [{"group": "Dirichlet 0.5, 10 clients", "label": "FedMoCo v2", "method": "fedmoco", "knn": k,
             "probe": k + 0.1, "finetune": None, "knn_init": 0.2, "memory": 1e6, "flops": 1e8, "comm": 2e6,
             "train_seconds": 10.0, "seed": s} for s, k in enumerate((0.3, 0.5))]
    rows.append({"group": "pooled data", "label": "centralized MoCo v2 (ceiling)", "method": "centralized",
                 "knn": 0.6, "probe": 0.7, "finetune": None, "knn_init": 0.2, "memory": 3e6, "flops": 1e8, "comm": 0.0,
                 "train_seconds": 5.0, "seed": 0})
    folded = fold_seeds(rows)
    fed = next(r for r in folded if r["label"] == "FedMoCo v2")
    assert fed["seeds"] == 2 and fed["knn"] == pytest.approx(0.4) and fed["knn_spread"] == pytest.approx(0.1)
    page = render_results_page(COMPARE_PRESETS["gpu-paper"], rows, when="2026-01-01", machine="test machine",
                               command="fedssl bench compare", plots=["results/a.png"], reliability="## Reliability\n")
    assert "40.00% ± 10.00" in page and "— (pooled)" in page and "![a](results/a.png)" in page
    assert "87.71%" in page and "## Reliability" in page


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 0.30), (2.0, 0.25), (3.0, 0.50), (4.0, 0.45), (5.0, 0.60)]
    assert pareto_front(points) == [(1.0, 0.30), (3.0, 0.50), (5.0, 0.60)]


def test_every_bad_config_case_of_the_reliability_page_holds(tmp_path: Path) -> None:
    checks = check_bad_configs(tmp_path)
    assert checks and all(c.held for c in checks), [c.outcome for c in checks if not c.held]


def test_rows_are_json_serialisable(tmp_path: Path) -> None:
    rows = run_comparison([_setting("c")], tmp_path)
    assert json.loads(json.dumps(rows))[0]["label"] == "FedMoCo" and torch.isfinite(torch.tensor(rows[0]["knn"]))
