"""Config: defaults, TOML presets, --set overrides and the errors a user can cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedssl.config import RunConfig, config_hash, dumps_toml, load_toml, make_config, to_dict
from fedssl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed() -> None:
    cfg = make_config({}, ["clients=100", "model.width=32", "model.blocks_per_stage=[2,2,2,2]", "partition=shards",
                          "ssl.temperature=0.1", "lr=1"])
    assert cfg.clients == 100 and cfg.model.width == 32 and cfg.model.blocks_per_stage == (2, 2, 2, 2)
    assert cfg.partition == "shards" and cfg.ssl.temperature == 0.1
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert make_config() == RunConfig()


def test_toml_round_trip_preserves_everything() -> None:
    cfg = make_config({}, ["clients=7", "model.blocks_per_stage=[1,2]", "data_dir=/x y"])
    import tomllib

    again = make_config(tomllib.loads(dumps_toml(to_dict(cfg))))
    assert again == cfg and config_hash(again) == config_hash(cfg)


@pytest.mark.parametrize("preset", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_every_preset_is_valid(preset: Path) -> None:
    make_config(load_toml(preset))


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["method=fedfoo"], "'method': unknown value 'fedfoo'; choose one of"),
    (["colour=red"], "unknown config key 'colour'"),
    (["model.depthh=3"], "unknown config key 'model.depthh' in section [model]"),
    (["clients=0"], "'clients': 0 is out of range"),
    (["clients=20000"], "out of range"),
    (["alpha=0"], "'alpha': 0.0 must be > 0"),
    (["alpha=-1"], "must be > 0"),
    (["clients=ten"], "'clients': expects an integer"),
    (["sample_fraction=0"], "sample_fraction"),
    (["model=3"], "is a section"),
    (["noequals"], "is not key=value"),
])
def test_bad_values_name_the_key_and_the_fix(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config({}, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("clients = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_every_method_brings_its_rules_and_runs_on_its_defaults() -> None:
    """``fedssl run --method NAME`` with no other flag: the method's default backbone, a valid config, a method."""
    import torch

    from fedssl.data.datasets import load_split
    from fedssl.methods import METHODS, build_method
    from fedssl.methods.base import MethodContext

    info = load_split("synthetic", "train", image_size=32, synthetic_size=8).info
    for name, cls in METHODS.items():
        cfg = make_config({}, [f"method={name}"])
        assert cfg.model.arch == cls.default_model.get("arch", "resnet"), name
        assert type(build_method(MethodContext(cfg, info, torch.device("cpu")))) is cls
    assert make_config({}, ["method=fedmae", "model.width=32", "model.heads=2"]).model.depth == 4  # the user's win
    assert make_config({}, ["method=lw-fedssl"]) == make_config({}, ["method=lw-fedssl", "model.arch=resnet"])
