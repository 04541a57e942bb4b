"""Speed and memory of the MocoSFL simulation: 10 / 100 / 1,000 clients vs centralized MoCo vs a per-client loop.

    python benchmarks/mocosfl_speed.py --data-dir ../shared/data

Every setting trains configs/cifar10/mocosfl.toml with a ResNet-18 (width 16, GroupNorm, cut 1: :data:`RESNET18`)
with the SAME server batch (default 1,000 images per step): centralized MoCo v2 with batch 1,000;
MocoSFL with 10 clients x 100 images, 100 x 10 and 1,000 x 1, all clients of a step in one batched
call on stacked weights; MocoSFL with 1,000 x 1 simulated one client after another
(``split.simulate = "loop"``, the same stacked maths one client at a time); and the reference code's
way, the plain per-client loop: 1,000 client-net copies (online + momentum ``nn.Module``s), 1,000
``torch.optim.SGD``s, and per step a Python loop over the clients (augment its image, forward; after
the ONE shared server step: backward, optimizer step, EMA), FedAvg of the module copies at the sync.
The server step is the same code in every MocoSFL setting. Each setting runs in its own subprocess (so its peak
resident memory, ru_maxrss, is its own): one warm-up step, then one timed round of ``--steps`` steps;
the whole sequence runs ``--repeats`` times and each setting reports its fastest run.
Printed side by side: images/s, the ratio to centralized, the seconds per step spent in the client
side of the simulation (client forward + client update) and in the server step, and peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from fedssl.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "cifar10" / "mocosfl.toml"
# the network this benchmark has always timed (the preset's until 2026-12-07; it now trains a ResNet-10)
RESNET18 = ("model.blocks_per_stage=[2,2,2,2]", "model.group_channels=0")
RESULTS = REPO / "benchmarks" / "results"


def settings(server_batch: int) -> list[tuple[str, list[str]]]:
    """(label, config overrides) of every setting; the same server batch everywhere."""
    out: list[tuple[str, list[str]]] = [
        (f"centralized MoCo v2, batch {server_batch}",
         ["method=centralized", f"batch_size={server_batch}", "ssl.in_batch_negatives=false"])]
    for clients in (10, 100, 1000):
        out.append((f"MocoSFL {clients:,} clients x {server_batch // clients}, batched",
                    [f"clients={clients}", f"split.client_batch={server_batch // clients}"]))
    out.append((f"MocoSFL 1,000 clients x {server_batch // 1000}, stacked maths one client at a time",
                ["clients=1000", f"split.client_batch={server_batch // 1000}", "split.simulate=loop"]))
    out.append((f"MocoSFL 1,000 clients x {server_batch // 1000}, plain per-client loop (reference code)",
                ["clients=1000", f"split.client_batch={server_batch // 1000}", REFERENCE_LOOP]))
    return out


REFERENCE_LOOP = "reference-loop"  # not a config key: the child runs ``reference_loop`` instead of the engine


def reference_loop(method: Any, fed: Any, steps: int, totals: dict[str, float]) -> int:
    """``steps`` steps the reference code's way (module copies, one optimizer each, a loop); returns images."""
    import copy

    from fedssl.models.momentum import deactivate_requires_grad, ema_update

    cfg, n, batch = method.cfg, method.num_clients, method.split.client_batch
    device = method.ctx.device
    online = [copy.deepcopy(method.server.client_nets(momentum=False)["online"]) for _ in range(n)]
    momentum = [copy.deepcopy(net) for net in online]
    for net in momentum:
        deactivate_requires_grad(net)
    optimizers = [torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum,
                                  weight_decay=cfg.weight_decay) for net in online]
    images = [fed.client_data(i).images for i in range(n)]
    clients = torch.arange(n)

    def step(s: int) -> None:
        start = _clock(device)
        queries, keys = [], []
        for i in range(n):
            rows = torch.arange(s * batch, (s + 1) * batch) % len(images[i])
            augment_start = _clock(device)
            view1, view2 = method.clients.augment(images[i][rows].to(device))  # each client augments its own images
            totals["augment"] += _clock(device) - augment_start
            queries.append(online[i](view1))
            with torch.no_grad():
                keys.append(momentum[i](view2))
        totals["client"] += _clock(device) - start
        start = _clock(device)
        result = method.server.step(torch.stack([q.detach() for q in queries]), torch.stack(keys), clients, cfg.lr)
        totals["server"] += _clock(device) - start
        start = _clock(device)
        for i in range(n):
            queries[i].backward(result.grad[i])
            optimizers[i].step()
            optimizers[i].zero_grad(set_to_none=True)
            ema_update(momentum[i], online[i], cfg.ssl.momentum)
        totals["client"] += _clock(device) - start

    def sync() -> None:
        start = _clock(device)
        with torch.no_grad():
            for nets in (online, momentum):
                averaged = [torch.stack(ps).mean(0) for ps in zip(*(list(net.parameters()) for net in nets))]
                for net in nets:
                    for p, a in zip(net.parameters(), averaged):
                        p.copy_(a)
        totals["client"] += _clock(device) - start

    step(0)  # warm-up
    totals.clear()
    for s in range(1, steps + 1):
        step(s)
    sync()
    return steps * n * batch


def _clock(device: torch.device) -> float:
    """Seconds now, after the device finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed(fn: Callable[..., Any], totals: dict[str, float], key: str, device: torch.device) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _clock(device)
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += _clock(device) - start
    return wrapper


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak resident memory, and on a GPU its peak allocated memory too."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def child(overrides: list[str], steps: int, threads: int) -> dict[str, Any]:
    """One setting, in this process: a warm-up round, then a timed round of ``steps`` steps."""
    from fedssl.config import load_toml, make_config
    from fedssl.engines.local import SilentObserver, load_federation, resolve_device, run_round
    from fedssl.methods import METHODS, build_method
    from fedssl.methods.base import MethodContext
    from fedssl.methods.split import SplitMethod
    from fedssl.resources import Ledger

    torch.set_num_threads(threads)
    reference = REFERENCE_LOOP in overrides
    cfg = make_config(load_toml(PRESET), [*RESNET18, f"split.sync_every={steps}", f"local_steps={steps}",
                                          "rounds=10",
                                          *(o for o in overrides if o != REFERENCE_LOOP)])
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    method = build_method(MethodContext(cfg, fed.train.info, device))
    totals: dict[str, float] = defaultdict(float)
    if reference:
        images = reference_loop(method, fed, steps, totals)
        seconds = totals["client"] + totals["server"]  # the timed steps and the sync: all the loop does
        return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
                "client_s_per_step": totals["client"] / steps, "server_s_per_step": totals["server"] / steps,
                "augment_s_per_step": totals["augment"] / steps, **peak_memory(device)}
    split = isinstance(method, SplitMethod)
    if split:
        method.clients.forward = _timed(method.clients.forward, totals, "client", device)
        method.clients.backward = _timed(method.clients.backward, totals, "client", device)
        method.server_step = _timed(method.server_step, totals, "server", device)
    # warm-up: one step (oneDNN builds its kernels for each new shape); rounds 1 and 2 because round 0
    # would also measure the server step under the profiler
    if split:
        method.split = replace(method.split, sync_every=1)
        run_round(method, fed, cfg, 1, Ledger(rows=[]), SilentObserver())
        method.split = replace(method.split, sync_every=steps)
    else:
        method.cfg = replace(cfg, local_steps=1)
        run_round(method, fed, cfg, 1, Ledger(rows=[]), SilentObserver())
        method.cfg = cfg
    totals.clear()
    start = _clock(device)
    row = run_round(method, fed, cfg, 2, Ledger(rows=[]), SilentObserver())
    seconds = _clock(device) - start
    return {"images": row["images"], "seconds": seconds, "images_per_s": row["images"] / seconds,
            "client_s_per_step": totals["client"] / steps if totals else None,
            "server_s_per_step": totals["server"] / steps if totals else None, **peak_memory(device)}


def run_child(overrides: list[str], steps: int, threads: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides), "--steps", str(steps),
                           "--threads", str(threads)], capture_output=True, text=True, check=False, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"setting {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt_bytes(n: float) -> str:
    from fedssl.resources import human_bytes

    return human_bytes(n)


def fmt_memory(row: dict[str, Any]) -> str:
    """Peak resident memory, and the peak GPU memory where the setting ran on a GPU."""
    rss = fmt_bytes(row["peak_rss_bytes"])
    return rss if row.get("peak_gpu_bytes") is None else f"{rss} RSS, {fmt_bytes(row['peak_gpu_bytes'])} GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar-10-batches-py (default ../shared/data)")
    parser.add_argument("--server-batch", type=int, default=1000, help="images per server step in every setting")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on a GPU the table is written to "
                        "results/mocosfl_speed_cuda.md and shows peak GPU memory too")
    parser.add_argument("--repeats", type=int, default=2, help="run the sequence of settings this many times; "
                        "each setting reports its fastest run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.steps, args.threads)))
        return
    from fedssl.engines.local import resolve_device
    from fedssl.errors import FedSSLError

    try:
        on_gpu = resolve_device(args.device).type == "cuda"  # before any setting: one clear line if it is not here
    except FedSSLError as err:
        parser.error(str(err).replace("--set device=", "--device "))
    console = Console(width=max(160, Console().width))
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(args.repeats):  # the whole sequence again: drift of the machine hits every setting
        for label, overrides in settings(args.server_batch):
            console.print(f"[dim]measuring {label} ({repeat + 1}/{args.repeats}) ...[/dim]")
            runs[label].append(run_child([f"data_dir={args.data_dir}", f"device={args.device}", *overrides],
                                         args.steps, args.threads))
    # the fastest repeat of each setting (the least disturbed by other work); peak memory: the largest
    rows = [{"setting": label, **max(found, key=lambda r: r["images_per_s"]),
             **{key: max(r[key] for r in found) for key in ("peak_rss_bytes", "peak_gpu_bytes") if key in found[0]}}
            for label, found in runs.items()]
    base = rows[0]["images_per_s"]
    loop = rows[-1]["images_per_s"]
    table = Table(title=f"MocoSFL simulation speed: ResNet-18 width 16 (GroupNorm), cut 1, server batch "
                        f"{args.server_batch}, {args.threads} threads; {args.steps} timed steps after a warm-up step, "
                        f"best of {args.repeats}")
    for col in ("setting", "images/s", "vs centralized", "vs per-client loop", "client side s/step",
                "server s/step", "peak memory"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / base:.2f}x",
                      f"{r['images_per_s'] / loop:.2f}x",
                      "—" if r["client_s_per_step"] is None else f"{r['client_s_per_step']:.3f}",
                      "—" if r["server_s_per_step"] is None else f"{r['server_s_per_step']:.3f}",
                      fmt_memory(r))
    console.print(table)
    batched, looped = rows[3], rows[-1]
    summary = (f"1,000 clients, batched: {batched['images_per_s'] / base:.2f}x centralized images/s; "
               f"{batched['images_per_s'] / looped['images_per_s']:.1f}x the plain per-client loop overall, "
               f"{looped['client_s_per_step'] / batched['client_s_per_step']:.1f}x on the client side of the step "
               f"(the server step, the same code in both, takes {batched['server_s_per_step']:.2f} s of every "
               f"{batched['seconds'] / args.steps:.2f} s batched step). Of the plain loop's client side, "
               f"{looped['augment_s_per_step']:.1f} s per step is augmenting one client's image at a time.")
    machine = (f"{datetime.date.today().isoformat()}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPU "
               f"cores, torch {torch.__version__}, {args.threads} threads, device {args.device}"
               + (f" ({torch.cuda.get_device_name(args.device)})" if on_gpu else ""))
    console.print(summary)
    console.print(f"[dim]{machine}[/dim]")
    out = RESULTS / ("mocosfl_speed_cuda.md" if on_gpu else "mocosfl_speed.md")
    write_markdown(rows, table.title, summary, machine, out)
    console.print(f"written: {out}")


def write_markdown(rows: list[dict[str, Any]], title: Any, summary: str, machine: str, path: Path) -> None:
    base, loop = rows[0]["images_per_s"], rows[-1]["images_per_s"]
    cols = ("setting", "images/s", "vs centralized", "vs per-client loop", "client side s/step", "server s/step",
            "peak memory")
    lines = [f"# {title}", "", f"Measured {machine} by `python benchmarks/mocosfl_speed.py`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        client = "—" if r["client_s_per_step"] is None else f"{r['client_s_per_step']:.3f}"
        server = "—" if r["server_s_per_step"] is None else f"{r['server_s_per_step']:.3f}"
        lines.append(f"| {r['setting']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
                     f"{r['images_per_s'] / loop:.2f}x | {client} | {server} | {fmt_memory(r)} |")
    lines += ["", summary, ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
