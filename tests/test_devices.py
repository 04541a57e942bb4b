"""Device profiles and the simulated clock: parsing, bad profiles, and the clock on hand-computed rounds."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedssl.cli import main
from fedssl.config import DeviceProfile, config_hash, dumps_toml, load_toml, make_config, to_dict
from fedssl.devices.clock import SplitStepCost, federated_round_time, split_client_round_time, split_round_time
from fedssl.devices.fleet import assign_profiles, fleet_of
from fedssl.devices.profiles import BUILTIN
from fedssl.errors import ConfigError
from tests.helpers import tiny_args

MYCAM = """
[devices]
mix = { rpi4 = 0.25, mycam = 0.75 }
round_deadline_s = 30.0

[devices.profiles.mycam]
memory_mib = 256
gflops = 2.5
up_mbps = 1
down_mbps = 5
rtt_ms = 80
power_w = 1.5
availability = 0.9
"""


def test_profiles_from_toml_round_trip_and_a_seeded_fleet(tmp_path: Path) -> None:
    preset = tmp_path / "fleet.toml"
    preset.write_text(MYCAM)
    cfg = make_config(load_toml(preset), ["clients=8"])
    assert cfg.devices.profiles["mycam"] == DeviceProfile(256.0, 2.5, 1.0, 5.0, 80.0, 1.5, 0.9)
    assert cfg.devices.mix == {"rpi4": 0.25, "mycam": 0.75} and cfg.devices.round_deadline_s == 30.0
    again = make_config(tomllib.loads(dumps_toml(to_dict(cfg))))  # config.toml of a run: read back the same
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert hash(again) == hash(cfg) and {cfg: 1}[again] == 1  # a config keys caches (a Flower node's partition)
    fleet = fleet_of(cfg, 8)
    assert fleet is not None and sorted(fleet.names).count("mycam") == 6 and fleet.names.count("rpi4") == 2
    assert fleet_of(cfg, 8) == fleet  # a resumed run gets the same fleet
    assert fleet.profile(fleet.names.index("rpi4")) == BUILTIN["rpi4"] and fleet.server == BUILTIN["server-gpu"]
    assert make_config({}, ["clients=8", "devices.mix={mycam=0.75,rpi4=0.25}",
                            "devices.profiles.mycam={memory_mib=256,gflops=2.5,up_mbps=1,down_mbps=5,rtt_ms=80,"
                            "power_w=1.5,availability=0.9}", "devices.round_deadline_s=30"]) == cfg


def test_the_mix_is_exact_and_seeded() -> None:
    names = assign_profiles({"a": 0.5, "b": 0.3, "c": 0.2}, 10, seed=0)
    assert (names.count("a"), names.count("b"), names.count("c")) == (5, 3, 2)
    assert assign_profiles({"c": 0.2, "b": 0.3, "a": 0.5}, 10, seed=0) == names  # the order written does not matter
    assert assign_profiles({"a": 0.5, "b": 0.5}, 3, seed=0).count("a") == 2  # a tied remainder: by name
    assert len({assign_profiles({"a": 0.5, "b": 0.5}, 10, seed=s) for s in range(5)}) > 1


def test_no_devices_section_is_no_fleet_and_the_same_digest() -> None:
    cfg = make_config({}, [])
    assert fleet_of(cfg, 10) is None
    assert config_hash(cfg) == "65d2590e79c86944"  # the digest of the defaults before [devices] existed


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["devices.mix={nope=1.0}"], "'devices.mix.nope': unknown profile 'nope'; use one of rpi4, phone"),
    (["devices.mix={rpi4=0.5,phone=0.4}"], "'devices.mix': the shares sum to 0.9, not 1"),
    (["devices.mix={rpi4=1.5,phone=-0.5}"], "'devices.mix.rpi4': share 1.5 must be in (0, 1]"),
    (["devices.mix={x=1.0}", "devices.profiles.x={memory_mib=1,gflops=1,up_mbps=-3,down_mbps=1}"],
     "'devices.profiles.x.up_mbps': -3.0 must be a positive number"),
    (["devices.mix={x=1.0}", "devices.profiles.x={memory_mib=1,gflops=1,up_mbps=1}"],
     "'devices.profiles.x.down_mbps': 0.0 must be a positive number"),
    (["devices.profiles.x={memory_mib=1,gflops=1,up_mbps=1,down_mbps=1,bandwidth=3}"],
     "unknown config key 'devices.profiles.x.bandwidth' in section [devices.profiles.x]"),
    (["devices.profiles.x={memory_mib=1,gflops=1,up_mbps=1,down_mbps=1,availability=0}"],
     "'devices.profiles.x.availability': 0.0 must be in (0, 1]"),
    (["devices.profiles.rpi4={memory_mib=1,gflops=1,up_mbps=1,down_mbps=1}"], "'rpi4' is a built-in profile"),
    (["devices.profiles.x=3"], "'devices.profiles.x': is a section"),
    (["devices.mix=3"], "'devices.mix': expects a table such as { name = 0.5 }"),
    (["devices.server=gpu"], "'devices.server': unknown profile 'gpu'"),
    (["devices.round_deadline_s=10"], "a deadline needs a fleet; set devices.mix"),
    (["devices.mix={rpi4=1.0}", "devices.round_deadline_s=-1"], "'devices.round_deadline_s': must be >= 0"),
])
def test_bad_profiles_name_the_key_and_the_fix(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config({}, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_bad_profile_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", *tiny_args("--set=devices.mix={rpi4=0.5,phone=0.6}"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedssl: error: config key 'devices.mix': the shares sum to 1.1, not 1")
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()


# ------------------------------------------------------------------ the clock, by hand

FAST = DeviceProfile(memory_mib=1024, gflops=10.0, up_mbps=80.0, down_mbps=80.0, rtt_ms=0.0)  # 1e7 bytes/s
SLOW = DeviceProfile(memory_mib=1024, gflops=1.0, up_mbps=1.0, down_mbps=8.0, rtt_ms=100.0)  # 1.25e5 / 1e6 bytes/s


def _profiles(*profiles: DeviceProfile):  # noqa: ANN202 - client -> profile
    return lambda client: profiles[client]


def test_clock_of_a_fedavg_round() -> None:
    """2 clients of a FedAvg round: the same 1 MB model down, 0.25 MB up, 1 MFLOP per image."""
    rows = [{"round": 0, "client": c, "kind": kind, "bytes": size, **extra}
            for c, images in ((0, 500), (1, 2000))
            for kind, size, extra in (("download", 1_000_000, {}), ("upload", 250_000, {"images": images}))]
    time = federated_round_time(rows, _profiles(SLOW, FAST), flops_per_image=1e6)
    # client 0 (SLOW): RTT 0.1 + down 1e6 / 1e6 + compute 500 * 1e6 / 1e9 + up 2.5e5 / 1.25e5 = 3.6 s
    assert math.isclose(time.clients[0].total_s, 0.1 + 1.0 + 0.5 + 2.0)
    # client 1 (FAST): down 0.1 + compute 2000 * 1e6 / 1e10 = 0.2 + up 0.025 = 0.325 s
    assert math.isclose(time.clients[1].total_s, 0.1 + 0.2 + 0.025)
    assert math.isclose(time.seconds, 3.6) and time.late == ()  # the round waits for its slowest client
    # the same round with a 2-second deadline: client 0 is late (its upload never sent), the round ends at 2 s
    rows = [r for r in rows if not (r["client"] == 0 and r["kind"] == "upload")]
    rows[0] = {**rows[0], "late": 1, "images": 500}
    late = federated_round_time(rows, _profiles(SLOW, FAST), flops_per_image=1e6, deadline_s=2.0)
    assert late.late == (0,) and late.seconds == 2.0
    assert math.isclose(late.clients[0].compute_s, 0.5) and late.clients[0].up_s == 0.0


def test_clock_of_a_layerwise_round() -> None:
    """A layer-wise round of stage 2: client 0 joins now and downloads the frozen block once (3 MB: active block
    1 MB + frozen 2 MB), client 1 already holds it (1 MB); both upload only the active block (1 MB); the step's
    FLOPs include the frozen block's forward (the ledger's measured step: 4 MFLOP per image)."""
    rows = [{"round": 3, "client": 0, "kind": "download", "bytes": 3_000_000},
            {"round": 3, "client": 0, "kind": "upload", "bytes": 1_000_000, "images": 100},
            {"round": 3, "client": 1, "kind": "download", "bytes": 1_000_000},
            {"round": 3, "client": 1, "kind": "upload", "bytes": 1_000_000, "images": 100}]
    time = federated_round_time(rows, _profiles(FAST, FAST), flops_per_image=4e6)
    # client 0: down 3e6 / 1e7 = 0.3 + compute 100 * 4e6 / 1e10 = 0.04 + up 0.1 = 0.44 s; client 1: 0.24 s
    assert math.isclose(time.clients[0].total_s, 0.44) and math.isclose(time.clients[1].total_s, 0.24)
    assert math.isclose(time.seconds, 0.44)


def test_clock_of_a_mocosfl_round() -> None:
    """3 steps of 2 clients (client 0 sits the last one out), then the sync; batch 4, 1 MFLOP per image on the
    client, 2 MFLOP on the server (at 100 GFLOP/s)."""
    a = DeviceProfile(memory_mib=64, gflops=1.0, up_mbps=8.0, down_mbps=8.0, rtt_ms=10.0)  # 1e6 bytes/s
    b = DeviceProfile(memory_mib=64, gflops=2.0, up_mbps=16.0, down_mbps=16.0, rtt_ms=0.0)  # 2e6 bytes/s
    server = DeviceProfile(memory_mib=1 << 15, gflops=100.0, up_mbps=1e4, down_mbps=1e4)
    rows = [{"round": 0, "client": 0, "kind": "upload", "bytes": 0, "steps": 2, "images": 8,
             "activation_bytes": 200_000, "weight_bytes": 1_000_000},
            {"round": 0, "client": 0, "kind": "download", "bytes": 0, "steps": 2, "gradient_bytes": 100_000,
             "weight_bytes": 1_000_000},
            {"round": 0, "client": 1, "kind": "upload", "bytes": 0, "steps": 3, "images": 12,
             "activation_bytes": 300_000, "weight_bytes": 1_000_000},
            {"round": 0, "client": 1, "kind": "download", "bytes": 0, "steps": 3, "gradient_bytes": 150_000,
             "weight_bytes": 1_000_000}]
    time = split_round_time(rows, _profiles(a, b), server, SplitStepCost(1e6, 2e6), [[0, 1], [0, 1], [1]])
    step_a = 0.01 + 4e6 / 1e9 + 1e5 / 1e6 + 5e4 / 1e6  # RTT + forward/backward of 4 images + activations + gradients
    step_b = 4e6 / 2e9 + 1e5 / 2e6 + 5e4 / 2e6
    server_8, server_4 = 2e6 * 8 / 1e11, 2e6 * 4 / 1e11  # the server's step on 8 and on 4 images
    sync = max(0.01 + 1e6 / 1e6 + 1e6 / 1e6, 1e6 / 2e6 + 1e6 / 2e6)  # client-nets up, the average down
    assert math.isclose(step_a, 0.164) and math.isclose(step_b, 0.077)
    assert math.isclose(time.seconds, 2 * (step_a + server_8) + (step_b + server_4) + sync)
    assert math.isclose(time.seconds, 2.41540)
    assert math.isclose(time.clients[0].compute_s, 2 * 0.004) and math.isclose(time.clients[1].compute_s, 3 * 0.002)
    # client 0's own part of the round, what a deadline is held against: 2 steps and the sync
    own = split_client_round_time(a, SplitStepCost(1e6, 2e6), steps=2, images_per_step=4, activation_bytes=1e5,
                                  gradient_bytes=5e4, net_bytes_up=1e6, net_bytes_down=1e6)
    assert math.isclose(own.total_s, 2 * step_a + 2.01)
    # a client that sat the round out (late) holds nothing up
    rows.append({"round": 0, "client": 2, "kind": "download", "bytes": 0, "late": 1})
    with_late = split_round_time(rows, _profiles(a, b, a), server, SplitStepCost(1e6, 2e6), [[0, 1, 2], [0, 1], [1]])
    assert math.isclose(with_late.seconds, time.seconds) and with_late.late == (2,)
