"""Comparisons: the grid of a preset, resumable runs read back from their files, the results page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedssl.compare import (COMPARE_PRESETS, Setting, build_grid, ensure_run, finished_settings, run_comparison,
                            summarize_run)
from fedssl.errors import FedSSLError
from fedssl.fleet_page import fleet_section, time_to_gain
from fedssl.reliability import check_bad_configs
from fedssl.results_page import Claim, claim_verdict, fold_seeds, goals_section, pareto_front, render_results_page
from tests.helpers import TINY


def test_grids_cover_every_method_partition_and_client_count() -> None:
    main = build_grid(COMPARE_PRESETS["cpu"], ["data_dir=/data"])
    on_fleets = build_grid(COMPARE_PRESETS["cpu-fleets"], ["data_dir=/data"])
    cpu = main + on_fleets
    keys = [s.key for s in cpu]
    # 2 ceilings x 3 seeds + 10 federated methods x 3 seeds (Dirichlet, 10) + 10 (2 classes, 100) + 2 (IID, 100) + 1;
    # cpu-fleets: the 10 federated methods on each of the two fleets
    assert len(main) == 6 + 30 + 10 + 2 + 1 and len(on_fleets) == 2 * 10 and len(keys) == len(set(keys))
    assert not COMPARE_PRESETS["cpu"].fleets_only and COMPARE_PRESETS["cpu-fleets"].fleets_only
    assert all(s.group.startswith("fleet: ") for s in on_fleets) and not any(s.group.startswith("fleet") for s in main)
    fleets = [s.config() for s in on_fleets]
    assert all(c.devices.mix and c.eval.every == 1 and c.eval.val_fraction > 0 and c.clients == 100 for c in fleets)
    assert {c.devices.round_deadline_s for c in fleets} == {0.0, 30.0}
    labels = {s.label for s in cpu}
    assert {"FedMoCo v2", "FedMoCo v3 (ViT, end-to-end)", "FedSimCLR", "FedBYOL", "MocoSFL-1 (cut 1)",
            "LW-FedSSL", "Prog-FedSSL", "FedMAE (stage-wise)", "federated MAE (end-to-end)",
            "centralized MoCo v2 (ceiling)", "centralized MoCo v3 (ViT ceiling)"} <= labels
    groups = {s.group for s in cpu if s.label == "MocoSFL-1 (cut 1)"}
    assert groups == {"Dirichlet 0.5, 10 clients", "2 classes per client, 100 clients", "IID, 100 clients",
                      "2 classes per client, 1,000 clients", "fleet: 100 Raspberry Pi 4 on 10/2 Mbit/s",
                      "fleet: 50 phones + 50 Raspberry Pi 4, 30 s deadline"}
    headline = [s for s in cpu if s.group == COMPARE_PRESETS["cpu"].headline]
    assert {s.config().seed for s in headline} == {0, 1, 2}
    for setting in cpu:  # every config is valid, and every method gets the same passes over the data
        cfg = setting.config()
        assert cfg.data_dir == "/data" and cfg.rounds * cfg.local_epochs == 8
    paper = build_grid(COMPARE_PRESETS["gpu-paper"])
    assert len(paper) == 3 * (2 + 11 * 6 + 2 * 3) and {s.config().seed for s in paper} == {0, 1, 2}
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
    (tmp_path / "c").mkdir()  # a setting begun, not finished
    assert finished_settings([_setting("c"), setting, _setting("d")], tmp_path) == [setting]


def test_settings_run_two_at_a_time_give_the_rows_of_one_at_a_time(tmp_path: Path) -> None:
    settings = [_setting("p", "threads=1"), _setting("q", "threads=1", "seed=1")]
    started, ended = [], []
    parallel = run_comparison(settings, tmp_path / "two", lambda i, s: started.append(s.key), jobs=2,
                              finished=lambda i, s, seconds: ended.append((s.key, seconds)))
    serial = run_comparison(settings, tmp_path / "one", jobs=1)
    assert sorted(started) == ["p", "q"] and sorted(k for k, _ in ended) == ["p", "q"]
    assert all(seconds > 0 for _, seconds in ended)
    # the same runs; a row's wall time differs, and so may its code version if the checkout changes meanwhile
    def outcome(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in ("train_seconds", "code_version")} for row in rows]

    assert outcome(parallel) == outcome(serial) and all(row["code_version"] for row in parallel + serial)
    assert [r["key"] for r in parallel] == ["p", "q"] and parallel[0]["knn"] != parallel[1]["knn"]


def test_a_failing_setting_ends_a_parallel_comparison_with_its_message(tmp_path: Path) -> None:
    bad = Setting("bad", "FedMoCo", {**TINY, "data_dir": str(tmp_path / "nowhere"), "dataset": "cifar10",
                                     "download": False}, ("rounds=2", "local_steps=1"))
    with pytest.raises(FedSSLError, match="cifar"):
        run_comparison([bad, _setting("ok", "threads=1")], tmp_path, jobs=2)
    assert not (tmp_path / "bad" / "final.json").exists()
    with pytest.raises(FedSSLError, match="--jobs 0"):
        run_comparison([_setting("ok")], tmp_path, jobs=0)


def test_a_partial_page_names_what_is_still_to_run() -> None:
    headline = COMPARE_PRESETS["cpu"].headline
    rows = [_row(headline, "FedMoCo v2", "fedmoco", 0.3)]
    page = render_results_page(COMPARE_PRESETS["cpu"], rows, when="x", machine="m", command="c", plots=[],
                               reliability="", pending=["mocosfl-1-cut-1-iid-100c-s0", "fedbyol-x-s2"])
    assert "Partial page: 1 of 3 settings have finished" in page and "`fedbyol-x-s2`" in page
    assert "Partial" not in render_results_page(COMPARE_PRESETS["cpu"], rows, when="x", machine="m", command="c",
                                                plots=[], reliability="")


def _row(group: str, label: str, method: str, knn: float, seed: int = 0, **extra: float) -> dict:
    return {"group": group, "label": label, "method": method, "knn": knn, "probe": knn + 0.1, "finetune": None,
            "knn_init": 0.2, "probe_init": 0.25, "knn_pixels": 0.22, "memory": 1e6, "flops": 1e8, "comm": 2e6,
            "train_seconds": 10.0, "optimizer_steps": 100, "image_steps": 6400, "seed": seed,
            "code_version": "abc", **extra}


def test_seeds_fold_into_mean_and_spread_and_the_page_renders(tmp_path: Path) -> None:
    headline = COMPARE_PRESETS["gpu-paper"].headline
    rows = [_row(headline, "FedMoCo v2", "fedmoco", k, s) for s, k in enumerate((0.3, 0.5))]
    rows.append(_row("pooled data", "centralized MoCo v2 (ceiling)", "centralized", 0.6, comm=0.0))
    folded = fold_seeds(rows)
    fed = next(r for r in folded if r["label"] == "FedMoCo v2")
    assert fed["seeds"] == 2 and fed["knn"] == pytest.approx(0.4) and fed["knn_spread"] == pytest.approx(0.1)
    assert fed["knn_gain"] == pytest.approx(0.2) and fed["code_versions"] == ["abc"]
    page = render_results_page(COMPARE_PRESETS["gpu-paper"], rows, when="2026-01-01", machine="test machine",
                               command="fedssl bench compare", plots=["results/a.png"], reliability="## Reliability\n")
    assert "40.00% ± 10.00" in page and "— (pooled)" in page and "![a](results/a.png)" in page
    assert "87.71" in page and "## Reliability" in page and "random init" in page
    assert "+20.00 ± 10.00" in page and "same code: `abc`" in page
    mixed = render_results_page(COMPARE_PRESETS["gpu-paper"], [*rows, _row(headline, "FedBYOL", "fedbyol", 0.1,
                                                                            code_version="def")],
                                when="x", machine="m", command="c", plots=[], reliability="")
    assert "different code versions" in mixed and "(did not learn)" in mixed


def test_an_unmet_goal_gets_its_measured_reason_from_the_ceiling_of_its_backbone() -> None:
    group = "Dirichlet 0.5, 10 clients"
    resnet = [_row("pooled data", "centralized MoCo v2 (ceiling)", "centralized", 0.35, s, arch="resnet")
              for s in range(2)]  # +15 points: the backbone learns at this budget
    vit = [_row("pooled data", "centralized MoCo v3 (ViT ceiling)", "centralized", 0.25, arch="vit")]  # +5 only
    rows = fold_seeds([*resnet, *vit,
                       _row(group, "FedMoCo v2", "fedmoco", 0.22, arch="resnet", optimizer_steps=900),
                       _row(group, "MocoSFL-1 (cut 1)", "mocosfl", 0.30, arch="resnet"),
                       _row(group, "LW-FedSSL", "lw-fedssl", 0.21, arch="vit"),
                       _row("2 classes per client, 100 clients", "FedBYOL", "fedbyol", 0.1, arch="resnet")])
    lines = {line[2:line.rindex(" (", 0, line.index("):"))]: line
             for line in goals_section(rows, group).splitlines() if line.startswith("- ")}
    assert set(lines) == {"centralized MoCo v2 (ceiling)", "centralized MoCo v3 (ViT ceiling)", "FedMoCo v2",
                          "MocoSFL-1 (cut 1)", "LW-FedSSL"}  # ceilings and the headline setting only
    assert "**met**" in lines["MocoSFL-1 (cut 1)"] and "**met**" in lines["centralized MoCo v2 (ceiling)"]
    assert "the federation at this budget" in lines["FedMoCo v2"] and "+15.00" in lines["FedMoCo v2"]
    assert "900 optimizer steps" in lines["FedMoCo v2"]
    assert "the budget, not only the federation" in lines["LW-FedSSL"] and "+5.00" in lines["LW-FedSSL"]
    assert "were not enough for this backbone" in lines["centralized MoCo v3 (ViT ceiling)"]
    given = goals_section(rows, group, {"FedMoCo v2": "Because."})
    assert "Because." in given and "the budget, not only" in given


def test_claims_get_verdicts_from_the_measured_rows() -> None:
    group = "Dirichlet 0.5, 10 clients"
    e2e, lw = "FedMoCo v3 (ViT, end-to-end)", "LW-FedSSL"
    close = Claim("LW within 2.5", "x", (lw, group), (e2e, group), margin=0.025)
    rows = fold_seeds([_row(group, e2e, "fedmocov3", 0.40, s) for s in range(3)]
                      + [_row(group, lw, "lw-fedssl", k, s, memory=2.5e5) for s, k in enumerate((0.38, 0.39, 0.39))])
    assert claim_verdict(close, rows)[1] == "holds"
    far = Claim("LW within 0.5", "x", (lw, group), (e2e, group), margin=0.005)
    assert claim_verdict(far, rows)[1] == "does not hold"
    memory = Claim("memory", "x", (lw, group), (e2e, group), key="memory", margin=3.0, ratio=True)
    assert claim_verdict(memory, rows)[:2] == ("4.00x", "holds")
    flat = fold_seeds([_row(group, e2e, "fedmocov3", 0.205), _row(group, lw, "lw-fedssl", 0.21)])
    assert claim_verdict(close, flat)[1] == "cannot be tested here"  # neither learned: nothing to compare
    assert claim_verdict(Claim("c", "x", ("MocoSFL-1 (cut 1)", group), (e2e, group)), rows)[1] == \
        "cannot be tested here"  # not in the rows


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 0.30), (2.0, 0.25), (3.0, 0.50), (4.0, 0.45), (5.0, 0.60)]
    assert pareto_front(points) == [(1.0, 0.30), (3.0, 0.50), (5.0, 0.60)]


def test_every_bad_config_case_of_the_reliability_page_holds(tmp_path: Path) -> None:
    checks = check_bad_configs(tmp_path)
    assert checks and all(c.held for c in checks), [c.outcome for c in checks if not c.held]


def test_rows_are_json_serialisable(tmp_path: Path) -> None:
    rows = run_comparison([_setting("c")], tmp_path)
    assert json.loads(json.dumps(rows))[0]["label"] == "FedMoCo" and torch.isfinite(torch.tensor(rows[0]["knn"]))


def test_a_fleet_run_gives_time_to_random_init_plus_five_points_and_the_page_section(tmp_path: Path) -> None:
    """A fleet setting monitors kNN on a validation split each round with the simulated clock beside it; its row's
    curve is the metrics' (simulated seconds so far, monitor), and the page's fleet section shows the table and plot."""
    from fedssl.bench import _write_fleet_page
    from fedssl.compare import FLEET_EVAL, Block, ComparePreset, FleetSpec

    assert time_to_gain([(10.0, 0.21), (20.0, 0.26), (30.0, 0.3)], 0.2) == 20.0
    assert time_to_gain([(10.0, 0.21)], 0.2) is None
    spec = FleetSpec("two boards", "tiny", ("devices.mix={rpi4=1.0}",), Block("IID", ("partition=iid",), 3, (0,)))
    setting = Setting("f", "FedMoCo", TINY, ("rounds=2", "local_steps=1", *spec.overrides, *FLEET_EVAL),
                      group=spec.group)
    row = {"key": "f", "label": "FedMoCo", "group": spec.group, **summarize_run(ensure_run(setting, tmp_path))}
    metrics = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    fleet = row["fleet"]
    assert fleet["curve"] == [(m["sim_seconds_total"], m["knn_acc"]) for m in metrics] and len(metrics) == 2
    final = json.loads((tmp_path / "f" / "final.json").read_text())
    assert fleet["monitor_init"] == final["initial"]["val_knn_acc"] and fleet["fleet_mix"] == {"rpi4": 3}
    assert fleet["energy_j"] > 0 and fleet["late"] == fleet["unavailable"] == 0 and fleet["client_rounds"] == 6
    text = fleet_section([spec], [row], tmp_path / "docs")
    assert "### two boards" in text and "| FedMoCo |" in text and "monitor at random init + 5" in text
    assert (tmp_path / "docs" / "results" / "fleet-two-boards.png").is_file()
    assert "Not run yet" in fleet_section([spec], [], tmp_path / "docs")
    preset = ComparePreset("tiny-fleets", "one fleet", {}, {}, (), (), (), "", fleets=(spec,))
    page = _write_fleet_page(preset, [row], tmp_path / "docs", command="fedssl bench compare", wall="")
    assert page.name == "FLEETS.md" and "### two boards" in page.read_text() and "| FedMoCo |" in page.read_text()
    assert "Partial" not in page.read_text()
    partial = _write_fleet_page(preset, [row], tmp_path / "docs", command="c", wall="", pending=["g-s0"]).read_text()
    assert "Partial page: 1 of 2 settings have finished" in partial and "`g-s0`" in partial
