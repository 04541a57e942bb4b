"""Every shipped preset (configs/**/*.toml, globbed: a new one is covered as it lands) runs at tiny size
through the CLI and exports in both formats; each exported file, loaded in a fresh process that
imports torch alone, gives the features of the in-process final encoder (what ``fedssl eval`` scores).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedssl.cli import main
from fedssl.config import RunConfig, load_toml, make_config
from fedssl.methods import METHODS
from fedssl.data.augment import EvalTransform
from fedssl.engines.local import restore_final_encoder, torch_threads
from fedssl.evaluation import extract_features

pytestmark = pytest.mark.slow  # about 30 s: 11 tiny runs, 22 exports, one torch-only loader

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").rglob("*.toml"))
SUFFIXES = (".pt", ".pt2")  # TorchScript (the default) and torch.export
TINY_UNITS = 2  # ViT blocks / ResNet stages of the tiny backbone
# Overrides every preset accepts: synthetic 16x16 data, a narrow two-unit backbone, one step per round,
# an even split of the rounds over the stages, no probe and no monitor.
TINY = ["dataset=synthetic", "image_size=16", "clients=2", "local_steps=1", "batch_size=8",
        "model.width=8", f"model.depth={TINY_UNITS}", "model.heads=2", "model.patch_size=4",
        f"model.blocks_per_stage={[1] * TINY_UNITS}".replace(" ", ""),
        "ssl.proj_hidden=16", "ssl.proj_dim=8", "ssl.queue_size=16",
        "layerwise.rounds_per_stage=0", "layerwise.schedule=[]", "calibration.steps=1",
        "mae.decoder_width=8", "mae.decoder_heads=2", "mae.pictures=0", "split.sync_every=1",
        "eval.probe=false", "eval.every=0", "eval.knn_k=5"]

# Torch alone: fedssl is made unimportable, then each exported file is loaded the way the README says.
LOADER = """
import sys
sys.modules["fedssl"] = None  # any import of fedssl now fails: the files must load with torch alone
import torch
torch.set_num_threads(1)
jobs = torch.load(sys.argv[1])  # {name: (path, images (N, C, H, W) float in [0, 1])}
load = lambda p: torch.export.load(p).module() if p.endswith(".pt2") else torch.jit.load(p)
torch.save({name: load(path)(images) for name, (path, images) in jobs.items()}, sys.argv[2])
"""


def fewest_rounds(cfg: RunConfig) -> int:
    """One round per stage of the run's schedule (one round in all for an unstaged method)."""
    schedule_for = getattr(METHODS[cfg.method], "schedule_for", None)  # the staged methods' own schedule
    return schedule_for(cfg).num_stages if schedule_for is not None else 1


def tiny_overrides(preset: Path) -> list[str]:
    """``--set`` values that shrink ``preset`` to a few seconds (TINY_UNITS rounds cover any stage split)."""
    cfg = make_config(load_toml(preset), [*TINY, f"rounds={TINY_UNITS}"])
    return [*TINY, f"rounds={fewest_rounds(cfg)}"]


@dataclass
class Exported:
    """One preset's run: the exported files and the in-process features of ``images``."""

    paths: dict[str, Path]  # suffix -> exported file
    images: torch.Tensor  # (N, C, H, W) float in [0, 1]
    expected: torch.Tensor  # (N, D): the restored final encoder, as fedssl eval extracts features


def run_and_export(preset: Path, folder: Path) -> Exported:
    run = folder / "run"
    sets = [f"--set={item}" for item in tiny_overrides(preset)]
    assert main(["run", "--config", str(preset), *sets, "--quiet", "--out", str(run)]) == 0
    paths = {suffix: folder / f"encoder{suffix}" for suffix in SUFFIXES}
    for path in paths.values():
        assert main(["export", str(run), "--out", str(path)]) == 0
    encoder, info, size = restore_final_encoder(run)
    pixels = torch.randint(0, 256, (3, info.channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # (3, C, S, S)
    expected = extract_features(encoder, pixels, transform=EvalTransform(size, info.mean, info.std))
    return Exported(paths, pixels.float() / 255, expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported | BaseException]:
    """Every preset run and exported (or the error it raised), in ONE fixture: one torch-only loader for all."""
    results: dict[str, Exported | BaseException] = {}
    with torch_threads(1):  # tiny ops: a second thread only waits on a busy 2-core machine (50x slower here)
        for preset in PRESETS:
            name = str(preset.relative_to(REPO))
            try:
                results[name] = run_and_export(preset, tmp_path_factory.mktemp(preset.stem))
            except (Exception, SystemExit) as err:  # noqa: BLE001 - reported by that preset's own test
                results[name] = err
    return results


@pytest.fixture(scope="module")
def loaded(exported: dict[str, Exported | BaseException],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Features of every exported file, computed in a fresh ``python -I`` that imports torch alone."""
    folder = tmp_path_factory.mktemp("loader")
    jobs = {f"{name}{suffix}": (str(path), result.images) for name, result in exported.items()
            if isinstance(result, Exported) for suffix, path in result.paths.items()}
    torch.save(jobs, folder / "jobs.pt")
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, str(folder / "jobs.pt"), str(folder / "out.pt")],
                          capture_output=True, text=True, cwd=folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(folder / "out.pt")


def test_presets_are_found() -> None:
    assert len(PRESETS) >= 10 and all(p.suffix == ".toml" for p in PRESETS)


@pytest.mark.parametrize("preset", [str(p.relative_to(REPO)) for p in PRESETS])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_preset_runs_and_its_export_gives_the_in_process_features(
        preset: str, suffix: str, exported: dict[str, Exported | BaseException],
        loaded: dict[str, torch.Tensor]) -> None:
    result = exported[preset]
    if isinstance(result, BaseException):
        raise result
    got = loaded[f"{preset}{suffix}"]
    assert got.shape == result.expected.shape
    torch.testing.assert_close(got, result.expected, rtol=1e-4, atol=1e-5)
