"""The simulated clock against a hand calculation: one round of each method kind on a fleet, side by side.

    python benchmarks/clock_check.py --data-dir ../shared/data     # about 2 min on 2 CPU cores

Each row is a real one-round run (``fedssl run`` in-process, the real CIFAR-10 subset, a small ResNet) on a
fleet of Raspberry Pi 4 boards and phones; the "clock" column is the run's own ``sim_seconds`` (metrics.jsonl),
the "by hand" column recomputes the round from the run's ledger.jsonl and the profiles with the formulas written
out below, on their own (no call into fedssl.devices):

- a round-based round (FedMoCo; LW-FedSSL's first stage): the slowest client's
  RTT + download bytes x 8 / downlink + FLOPs per image x images / GFLOP/s + upload bytes x 8 / uplink;
- a split round (MocoSFL): for each step, the slowest of its clients (RTT + its batch's client FLOPs / GFLOP/s +
  its activations up + its gradients down) plus the server's FLOPs for the whole batch on the server's profile;
  then the sync: the slowest client's RTT + its client-net up + the average down.
Written to benchmarks/results/clock_check.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.bench import machine_description  # noqa: E402
from fedssl.config import load_toml, make_config  # noqa: E402
from fedssl.engines.local import start_run  # noqa: E402
from fedssl.engines.steps import round_members  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.report import markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLEET = ("devices.mix={rpi4=0.5,phone=0.5}",)
SMALL = ("clients=4", "rounds=1", "model.width=8", "model.blocks_per_stage=[1,1]", "model.group_channels=0",
         "eval.probe=false", "eval.every=0", "download=false", "partition=iid")
KINDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("round-based (FedMoCo)", "fedmoco.toml", ("local_steps=3", "batch_size=16")),
    ("layer-wise (LW-FedSSL, stage 1)", "lw-fedssl-resnet.toml", ("local_steps=3", "batch_size=16",
                                                                  "rounds=2", "layerwise.rounds_per_stage=1")),
    ("split (MocoSFL, cut 1)", "mocosfl.toml", ("split.sync_every=5", "split.client_batch=4",
                                               "split.clients_per_step=0.5", "split.auto_adjust=false")),
)


def _seconds(bits_or_flops: float, rate: float) -> float:
    return bits_or_flops / rate


def hand_round_based(rows: list[dict], profiles: dict, names: list[str]) -> float:
    """The slowest client's RTT + download + training + upload (round 0)."""
    flops = [r for r in rows if r["kind"] == "step_cost" and r["round"] == 0][-1]["flops_per_image"]
    down = {r["client"]: r for r in rows if r["kind"] == "download" and r["round"] == 0}
    times = []
    for up in (r for r in rows if r["kind"] == "upload" and r["round"] == 0):
        p = profiles[names[up["client"]]]
        times.append(p["rtt_ms"] / 1000 + _seconds(8 * down[up["client"]]["bytes"], p["down_mbps"] * 1e6)
                     + _seconds(flops * up["images"], p["gflops"] * 1e9) + _seconds(8 * up["bytes"], p["up_mbps"] * 1e6))
    return max(times)


def hand_split(rows: list[dict], profiles: dict, server: dict, names: list[str], members: list[list[int]],
               batch: int) -> float:
    """Every step's slowest client + the server's step, then the sync (round 0)."""
    client_flops = [r for r in rows if r["kind"] == "step_cost"][-1]["flops_per_image"]
    server_flops = [r for r in rows if r["kind"] == "server_step_cost"][-1]["flops_per_image"]
    up = {r["client"]: r for r in rows if r["kind"] == "upload" and r["round"] == 0}
    down = {r["client"]: r for r in rows if r["kind"] == "download" and r["round"] == 0}
    seconds = 0.0
    for step in members:
        parts = []
        for c in step:
            p = profiles[names[c]]
            steps = up[c]["steps"]
            parts.append(p["rtt_ms"] / 1000 + _seconds(client_flops * batch, p["gflops"] * 1e9)
                         + _seconds(8 * up[c]["activation_bytes"] / steps, p["up_mbps"] * 1e6)
                         + _seconds(8 * down[c]["gradient_bytes"] / steps, p["down_mbps"] * 1e6))
        seconds += max(parts) + _seconds(server_flops * batch * len(step), server["gflops"] * 1e9)
    sync = [profiles[names[c]]["rtt_ms"] / 1000 + _seconds(8 * up[c]["weight_bytes"], profiles[names[c]]["up_mbps"] * 1e6)
            + _seconds(8 * down[c]["weight_bytes"], profiles[names[c]]["down_mbps"] * 1e6) for c in up]
    return seconds + max(sync)


def check(kind: str, preset: str, extra: tuple[str, ...], data_dir: str, threads: int, root: Path) -> list[str]:
    """Run one round of ``kind`` on the fleet; the clock's and the hand calculation's seconds."""
    cfg = make_config(load_toml(REPO / "configs" / "cifar10" / preset),
                      [f"data_dir={data_dir}", f"threads={threads}", *SMALL, *FLEET, *extra])
    out = root / preset.replace(".toml", "")
    start_run(cfg, out)
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    devices = json.loads((out / "final.json").read_text())["devices"]
    clock = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["sim_seconds"]
    names = [c["profile"] for c in devices["clients"]]
    if cfg.method == "mocosfl":
        members = [m.tolist() for m in round_members(cfg, cfg.split, 0, cfg.clients)]
        hand = hand_split(rows, devices["profiles"], devices["server"], names, members, cfg.split.client_batch)
    else:
        hand = hand_round_based(rows, devices["profiles"], names)
    return [kind, f"{clock:.6f} s", f"{hand:.6f} s", f"{abs(clock - hand) / hand:.1e}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "clock_check.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        body = [check(kind, preset, extra, args.data_dir, args.threads, Path(tmp)) for kind, preset, extra in KINDS]
    table = markdown_table(["one round of", "the clock (metrics sim_seconds)", "by hand (from the ledger)",
                            "relative difference"], body)
    command = " ".join(["python benchmarks/clock_check.py", *(argv if argv is not None else sys.argv[1:])])
    text = (f"# The simulated clock against a hand calculation\n\n`{command}`, "
            f"{datetime.date.today().isoformat()}, {machine_description()}. Fleet: {FLEET[0]}; "
            f"{', '.join(SMALL)}.\n\n{table}")
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
