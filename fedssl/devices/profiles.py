"""Built-in device profiles, and the checks of a ``[devices]`` section (``fedssl.config`` validates with them).

Every number has its source beside it. Where no vendor sheet or published benchmark gives the figure the
clock needs (a *sustained* training rate, a link a deployment would have), it is an estimate and says what
from. The links (Mbit/s, RTT) describe a deployment rather than a device: they are assumptions a user should
replace by their own (``[devices.profiles.<name>]``, see README "Devices and the simulated clock").
"""

from __future__ import annotations

import dataclasses
import math

from fedssl.config_io import check
from fedssl.config_schema import DeviceProfile, DevicesConfig

BUILTIN: dict[str, DeviceProfile] = {
    # Raspberry Pi 4 Model B, 4 GB.
    "rpi4": DeviceProfile(
        memory_mib=4096.0,  # Raspberry Pi Ltd, "Raspberry Pi 4 Model B" product brief: 1, 2, 4 or 8 GB LPDDR4; the 4 GB board
        gflops=8.0,  # B. Feiereisen, "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64" (2022): HPL about 8 GFLOP/s
        #              on the 4 Cortex-A72 cores; estimate: that dense-kernel rate stands in for PyTorch's conv training
        up_mbps=2.0,  # assumption: issue 15's example fleet, "100 Raspberry Pi 4 on 10/2 Mbit/s" (down / up)
        down_mbps=10.0,  # assumption: the same
        rtt_ms=50.0,  # assumption: a wide-area path from a home / field network to a cloud server
        power_w=6.0,  # estimate: a sustained 4-core load, under the 15 W (5 V, 3 A) supply the product brief specifies
        availability=1.0,  # assumption: a mains-powered board, always on
    ),
    # A mid-range Android phone (e.g. a Snapdragon 7-series class SoC) training on its CPU.
    "phone": DeviceProfile(
        memory_mib=1024.0,  # estimate: what one app may hold before Android's low-memory killer ends it on a 6 GB phone
        gflops=20.0,  # estimate: 2.5x the Raspberry Pi 4 figure above (newer Cortex-A7x big cores), thermally sustained
        up_mbps=10.0,  # assumption: a 4G link, the order of the Ookla Speedtest Global Index mobile upload median
        down_mbps=50.0,  # assumption: the same index's mobile download median, in order of magnitude
        rtt_ms=50.0,  # assumption: a 4G round trip to a cloud server
        power_w=4.0,  # estimate: a phone SoC's sustained multi-core load (a few W: the thermal limit of a handset)
        availability=0.8,  # assumption: reachable (charging, on Wi-Fi, idle) in 4 rounds out of 5
    ),
    # NVIDIA Jetson Nano (4 GB module), training on its GPU.
    "jetson-nano": DeviceProfile(
        memory_mib=4096.0,  # NVIDIA Jetson Nano module data sheet: 4 GB 64-bit LPDDR4, shared by CPU and GPU
        gflops=60.0,  # data sheet: 128-core Maxwell GPU at 921 MHz (472 GFLOP/s FP16, so 236 GFLOP/s FP32 peak);
        #               estimate: a quarter of the FP32 peak sustained in training
        up_mbps=10.0,  # assumption: a camera / robot on Wi-Fi behind a residential uplink
        down_mbps=50.0,  # assumption: the same
        rtt_ms=30.0,  # assumption: the same
        power_w=10.0,  # data sheet: the 10 W power mode (5 W is the other)
        availability=1.0,  # assumption: mains powered
    ),
    # NVIDIA Jetson Orin Nano 8 GB, training on its GPU.
    "jetson-orin-nano": DeviceProfile(
        memory_mib=8192.0,  # NVIDIA Jetson Orin Nano series data sheet: 8 GB 128-bit LPDDR5, shared by CPU and GPU
        gflops=320.0,  # data sheet: 1024 CUDA cores at up to 625 MHz, so 1,280 GFLOP/s FP32 peak; estimate: a quarter
        up_mbps=10.0,  # assumption: as jetson-nano
        down_mbps=50.0,  # assumption: as jetson-nano
        rtt_ms=30.0,  # assumption: as jetson-nano
        power_w=15.0,  # data sheet: the 15 W power mode of the 8 GB module (7 W is the other)
        availability=1.0,  # assumption: mains powered
    ),
    # A laptop with a 4-core x86 CPU (AVX2 + FMA) training on the CPU.
    "laptop-cpu": DeviceProfile(
        memory_mib=8192.0,  # estimate: half of a 16 GB laptop left to training
        gflops=100.0,  # estimate: 4 cores x 2 FMA units x 8 FP32 lanes x 2 FLOP x 3 GHz = 384 GFLOP/s peak; about a
        #                quarter of it sustained by PyTorch's conv training
        up_mbps=20.0,  # assumption: home broadband over Wi-Fi
        down_mbps=100.0,  # assumption: the same
        rtt_ms=20.0,  # assumption: the same
        power_w=28.0,  # estimate: the 28 W base power of a performance-laptop CPU (Intel P-series class)
        availability=0.9,  # assumption: open and online in 9 rounds out of 10
    ),
    # The split server (MocoSFL's server-side network): one NVIDIA A100 SXM4 40 GB in a data centre.
    "server-gpu": DeviceProfile(
        memory_mib=40960.0,  # NVIDIA A100 Tensor Core GPU data sheet: 40 GB HBM2
        gflops=10000.0,  # data sheet: 19.5 TFLOP/s FP32 peak (156 TF32 on tensor cores); estimate: half the FP32 peak
        up_mbps=10000.0,  # assumption: a 10 Gbit/s data-centre link (the clients' links bound every exchange)
        down_mbps=10000.0,  # assumption: the same
        rtt_ms=0.0,  # the clients' rtt_ms is the whole round trip
        power_w=400.0,  # data sheet: 400 W maximum power of the SXM4 module
        availability=1.0,
    ),
}


def profile_table(devices: DevicesConfig) -> dict[str, DeviceProfile]:
    """Every profile a config may name: the built-in ones and the user's."""
    return {**BUILTIN, **devices.profiles}


def validate_devices(devices: DevicesConfig) -> None:
    """[devices]: the user's profiles, the mix, the server profile, the deadline (ConfigError naming key and fix)."""
    for name, profile in devices.profiles.items():
        check(name not in BUILTIN, f"devices.profiles.{name}", f"'{name}' is a built-in profile; give yours another "
              f"name (built-in: {', '.join(BUILTIN)})")
        _validate_profile(profile, f"devices.profiles.{name}")
    known = profile_table(devices)
    for name, share in devices.mix.items():
        check(name in known, f"devices.mix.{name}", f"unknown profile '{name}'; use one of {', '.join(known)} "
              "or define it as [devices.profiles." + name + "]")
        check(0 < share <= 1, f"devices.mix.{name}", f"share {share} must be in (0, 1]")
    if devices.mix:
        total = sum(devices.mix.values())
        check(math.isclose(total, 1.0, abs_tol=1e-6), "devices.mix",
              f"the shares sum to {total:g}, not 1; e.g. devices.mix = {{ rpi4 = 0.5, phone = 0.5 }}")
    check(devices.server in known, "devices.server", f"unknown profile '{devices.server}'; use one of {', '.join(known)}")
    check(devices.round_deadline_s >= 0, "devices.round_deadline_s", "must be >= 0 simulated seconds (0 = no deadline)")
    check(devices.round_deadline_s == 0 or bool(devices.mix), "devices.round_deadline_s",
          "a deadline needs a fleet; set devices.mix, e.g. devices.mix = { rpi4 = 1.0 }")


def _validate_profile(profile: DeviceProfile, key: str) -> None:
    for field in ("memory_mib", "gflops", "up_mbps", "down_mbps"):
        value = getattr(profile, field)
        check(value > 0 and math.isfinite(value), f"{key}.{field}", f"{value} must be a positive number")
    check(profile.rtt_ms >= 0, f"{key}.rtt_ms", f"{profile.rtt_ms} must be >= 0 ms")
    check(profile.power_w >= 0, f"{key}.power_w", f"{profile.power_w} must be >= 0 W (0 = unknown)")
    check(0 < profile.availability <= 1, f"{key}.availability", f"{profile.availability} must be in (0, 1]")


def describe_profile(name: str, profile: DeviceProfile) -> str:
    """One line for a report: ``rpi4: 4096 MiB, 8 GFLOP/s, 2/10 Mbit/s up/down, 50 ms RTT, 6 W, available 100%``."""
    values = dataclasses.asdict(profile)
    power = f", {values['power_w']:g} W" if profile.power_w else ""
    return (f"{name}: {values['memory_mib']:g} MiB, {values['gflops']:g} GFLOP/s, {values['up_mbps']:g}/"
            f"{values['down_mbps']:g} Mbit/s up/down, {values['rtt_ms']:g} ms RTT{power}, "
            f"available {100 * profile.availability:g}%")
