"""The command line: every bad input gets one clear line and a non-zero exit, and never harms a run dir."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedssl.cli import EXIT_USER_ERROR, main
from tests.helpers import tiny_args

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedssl: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["run", *tiny_args("--set=rounds=1", "--quiet"), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(("argv", "fragment"), [
    (["run", "--method", "fedfoo"], "unknown value 'fedfoo'"),
    (["run", "--set", "colour=red"], "unknown config key 'colour'"),
    (["run", "--set", "clients=0"], "use 2 to 10000 clients"),
    (["run", "--set", "alpha=0"], "must be > 0"),
    (["run", "--config", "configs/none.toml"], "does not exist"),
    (["run", "--set", "dataset=synthetic", "--set", "partition=pathological", "--set", "classes_per_client=11"],
     "classes_per_client"),
    (["run", "--set", "dataset=cifar10", "--set", "data_dir=/nonexistent/data", "--set", "download=false"],
     "data_dir"),
    (["eval", "/nonexistent/run"], "not a fedssl run directory"),
])
def test_bad_input_gets_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str],
                                 fragment: str) -> None:
    out = tmp_path / "never"
    argv = argv + (["--out", str(out)] if argv[0] == "run" else [])
    assert fragment in _error_line(capsys, argv)
    assert not out.exists(), "a failed run must not leave a run directory behind"


def test_cifar_folder_with_wrong_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"nothing": 1}))
    err = _error_line(capsys, ["run", "--set", f"data_dir={tmp_path / 'data'}", "--set", "download=false",
                               "--out", str(tmp_path / "r")])
    assert "data_batch_1" in err or "cifar" in err.lower()


def test_existing_run_dir_is_never_overwritten(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                               tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert "already exists" in _error_line(capsys, ["run", *tiny_args(), "--out", str(finished_run)])
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint at all")
    assert "is corrupt" in _error_line(capsys, ["eval", str(copy)])
    assert "is corrupt" in _error_line(capsys, ["run", "--resume", str(copy)])


def test_checkpoint_of_another_config(capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    text = (copy / "config.toml").read_text().replace("clients = 3", "clients = 4")
    (copy / "config.toml").write_text(text)
    assert "belongs to another config" in _error_line(capsys, ["run", "--resume", str(copy)])


def test_resume_refuses_overrides(capsys: pytest.CaptureFixture[str], finished_run: Path) -> None:
    assert "--resume continues" in _error_line(capsys, ["run", "--resume", str(finished_run), "--set", "lr=1"])


def test_eval_export_report_commands(capsys: pytest.CaptureFixture[str], finished_run: Path, tmp_path: Path) -> None:
    assert main(["eval", str(finished_run), "--no-probe"]) == 0
    assert "knn_acc" in capsys.readouterr().out
    for name in ("enc.pt", "enc.pt2"):  # TorchScript, torch.export
        assert main(["export", str(finished_run), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 0
    assert "torch.export.load(path).module()" in capsys.readouterr().out
    (finished_run / "report.md").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert "Client cost" in (finished_run / "report.md").read_text()


def _drop_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "last.pt").unlink()


def _rewind_checkpoint(run: Path) -> None:
    """The checkpoint of a run killed before its last round (round 0 of 1)."""
    path = run / "checkpoints" / "last.pt"
    torch.save({**torch.load(path, weights_only=True), "round": 0}, path)


@pytest.mark.parametrize(("damage", "fragment"), [(_drop_checkpoint, "has no checkpoint yet"),
                                                  (_rewind_checkpoint, "stopped after round 0 of 1")])
def test_export_of_an_unfinished_run_gets_one_line(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                                   tmp_path: Path, damage: Callable[[Path], None],
                                                   fragment: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    damage(copy)
    out = tmp_path / "encoder.pt2"
    assert fragment in _error_line(capsys, ["export", str(copy), "--out", str(out)])
    assert not out.exists()


def test_export_to_a_folder_gets_one_line(capsys: pytest.CaptureFixture[str], finished_run: Path,
                                          tmp_path: Path) -> None:
    assert "cannot write" in _error_line(capsys, ["export", str(finished_run), "--out", str(tmp_path)])


def test_console_script_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("fedssl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedssl.cli"]
    proc = subprocess.run([*cmd, "run", "--set", "alpha=-1", "--out", str(tmp_path / "x")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.strip().splitlines() == ["fedssl: error: config key 'alpha': -1.0 must be > 0 "
                                                "(smaller = more non-IID)"]


def test_a_device_that_is_not_here_gets_one_line_before_anything_runs(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    out = tmp_path / "never"
    assert "CUDA is not available" in _error_line(capsys, ["run", *tiny_args("--set=device=cuda"), "--out", str(out)])
    assert not out.exists()
    runs = tmp_path / "compare"
    err = _error_line(capsys, ["bench", "compare", "--preset", "gpu-paper", "--set", "device=cuda", "--runs", str(runs),
                               "--docs", str(tmp_path / "docs"), "--no-reliability"])
    assert "device cuda was asked for but CUDA is not available" in err and not runs.exists()
    assert "cpu, cuda or cuda:N" in _error_line(capsys, ["run", *tiny_args("--set=device=gpu"), "--out", str(out)])
    only = ["bench", "compare", "--preset", "gpu-paper", "--only", "fedfoo-*", "--runs", str(runs), "--no-reliability"]
    assert "matches no setting" in _error_line(capsys, only) and not runs.exists()
    page = ["bench", "compare", "--preset", "cpu", "--page-only", "--runs", str(runs), "--docs", str(tmp_path / "d")]
    assert "run it without --page-only first" in _error_line(capsys, page) and not (tmp_path / "d").exists()


def test_resolve_device_parses_cpu_cuda_and_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedssl.engines.local import resolve_device
    from fedssl.errors import FedSSLError

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FedSSLError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    for bad in ("gpu", "cuda:", "cuda:x", "CUDA", "cuda1"):
        with pytest.raises(FedSSLError, match="cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedSSLError, match="CUDA is not available"):
        resolve_device("cuda:0")
