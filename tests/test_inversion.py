"""The split inversion attack (``fedssl attack``): on a real tiny MocoSFL run, a deeper cut gives the server
worse reconstructions; its files and report section are written; bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedssl.cli import main
from fedssl.config import InversionConfig
from fedssl.engines.local import start_run
from fedssl.privacy.inversion import FIGURE_FILE, RESULT_FILE, attack_run
from fedssl.run_dir import create_run_dir
from tests.helpers import tiny_config

# A ResNet-10 (one block per stage) on 16 x 16 images: cut 1 = the stem (16x16), cut 3 = stem + two blocks
# (the second downsamples: 8x8), cut 4 = one more downsampling block (4x4).
CUTS = (1, 3, 4)
TINY_ATTACK = InversionConfig(cuts=CUTS, steps=60, images=16, shown=4, batch_size=32, hidden=16)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-round MocoSFL run on tiny synthetic images (cut 1)."""
    path = tmp_path_factory.mktemp("inversion") / "mocosfl"
    cfg = tiny_config("method=mocosfl", "image_size=16", "ssl.temperature=0.1", "split.sync_every=2",
                      "split.client_batch=2", "eval.every=0", "eval.probe=false", "threads=1")
    start_run(cfg, path)
    return path


def test_psnr_falls_as_the_cut_deepens_and_the_files_are_written(split_run: Path) -> None:
    result = attack_run(split_run, TINY_ATTACK)
    rows = result["rows"]
    assert [r["cut"] for r in rows] == list(CUTS)
    for kind in ("trained", "random_init"):
        psnr = [r[kind]["psnr"] for r in rows]
        assert psnr[0] > psnr[1] > psnr[2], (kind, psnr)
        assert rows[0][kind]["ssim"] > rows[-1][kind]["ssim"], kind
    assert rows[0]["trained"]["psnr"] > result["floor"]["psnr"] + 3  # the shallow cut leaks far above the floor
    memory = [r["client_peak_training_bytes"] for r in rows]
    assert memory[0] < memory[1] < memory[2]  # the privacy bought by a deeper cut costs client memory
    assert [r["activation_shape"] for r in rows] == [[8, 16, 16], [16, 8, 8], [32, 4, 4]]
    on_disk = json.loads((split_run / RESULT_FILE).read_text())
    assert on_disk["rows"] == rows and on_disk["aux_images"] == 256 and on_disk["client_images"] == 16
    assert (split_run / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (split_run / "report.md").read_text()
    assert "## What a split server can see" in report and f"![inversion]({FIGURE_FILE})" in report
    assert "| 1 (this run) |" in report


def _fails_with_one_line(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedssl: error:") and "\n" not in err and "Traceback" not in err
    assert all(w in err for w in words), err


def test_bad_input_is_one_line_and_exit_2(split_run: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with_one_line(["attack", str(tmp_path / "missing")], capsys, "not a fedssl run directory")
    _fails_with_one_line(["attack", str(split_run), "--cuts", "1", "5"], capsys, "--cuts 5", "1 to 4")
    _fails_with_one_line(["attack", str(split_run), "--steps", "0"], capsys, "--steps")
    vit = create_run_dir(tmp_path / "vit", tiny_config("model.arch=vit")).path
    _fails_with_one_line(["attack", str(vit)], capsys, "vit", "mocosfl")
    fedmoco = create_run_dir(tmp_path / "fedmoco", tiny_config()).path
    _fails_with_one_line(["attack", str(fedmoco)], capsys, "split methods")
