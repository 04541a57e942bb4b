"""Benchmarks that print comparison tables (speed and memory live here, not in tests).

``overhead``: images/s and memory of centralized MoCo vs FedMoCo with 10 and
100 clients, on the same data and model (the demo preset), measured side by
side in one invocation. Each setting runs in its own subprocess so that its
peak resident memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from fedssl.config import RunConfig, load_toml, make_config
from fedssl.resources import human_bytes

REPO = Path(__file__).resolve().parents[1]
DEMO_PRESET = REPO / "configs" / "cifar10" / "fedmoco.toml"
OVERHEAD_SETTINGS: tuple[tuple[str, str, int], ...] = (
    ("centralized MoCo", "centralized", 1), ("FedMoCo, 10 clients", "fedmoco", 10),
    ("FedMoCo, 100 clients", "fedmoco", 100))


def measure_setting(cfg: RunConfig) -> dict[str, Any]:
    """Train one full pass over the training split (one round, every client once) and time it."""
    from fedssl.engines.local import SilentObserver, load_federation, run_round
    from fedssl.methods import METHODS, build_method
    from fedssl.methods.base import MethodContext
    from fedssl.resources import Ledger

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    method = build_method(MethodContext(cfg, fed.train.info, torch.device(cfg.device)))
    cost = method.measure_client_step(fed.client_data(0))
    warm = run_round(method, fed, cfg, 0, Ledger(rows=[]), SilentObserver())  # warm-up: oneDNN primitives per shape
    start = time.perf_counter()
    row = run_round(method, fed, cfg, 1, Ledger(rows=[]), SilentObserver())
    seconds = time.perf_counter() - start
    return {"images": row["images"], "seconds": seconds, "images_per_s": row["images"] / seconds,
            "warmup_images_per_s": warm["images_per_s"], "client_peak_bytes": cost.peak_training_bytes,
            "bytes_per_round": row["bytes_up"] + row["bytes_down"],
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _run_in_subprocess(overrides: list[str]) -> dict[str, Any]:
    code = ("import json, sys; from fedssl.bench import _child; print('RESULT ' + json.dumps(_child(sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark setting {overrides} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _child(overrides: list[str]) -> dict[str, Any]:
    return measure_setting(make_config(load_toml(DEMO_PRESET), overrides))


def run_overhead_benchmark(console: Console, *, data_dir: str = "", out: Path | None = None) -> list[dict[str, Any]]:
    """Print images/s and memory of centralized MoCo vs FedMoCo (10, 100 clients); returns the rows.

    With ``out``, the table is also written there as markdown, with the date and the machine.
    """
    rows = []
    for label, method, clients in OVERHEAD_SETTINGS:
        overrides = [f"method={method}", f"clients={max(clients, 2)}", "local_epochs=1", "local_steps=0"]
        if data_dir:
            overrides.append(f"data_dir={data_dir}")
        console.print(f"[dim]measuring {label} ...[/dim]")
        rows.append({"setting": label, **_run_in_subprocess(overrides)})
    base = rows[0]["images_per_s"]
    title = ("Federation overhead (demo preset: FedMoCo/MoCo v2, ResNet-10 width 16, CIFAR-10; one pass over the "
             "training split, after one warm-up pass)")
    header = ["setting", "images/s", "vs centralized", "client peak training memory", "process peak RSS",
              "bytes per round"]
    cells = [[r["setting"], f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}x",
              human_bytes(r["client_peak_bytes"]), human_bytes(r["process_peak_rss_bytes"]),
              human_bytes(r["bytes_per_round"])] for r in rows]
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    if out is not None:
        import datetime

        from fedssl.io import atomic_write_text
        from fedssl.report import markdown_table

        atomic_write_text(out, f"# {title}\n\nMeasured {datetime.date.today().isoformat()} on "
                               f"{machine_description()} by `python benchmarks/federation_overhead.py"
                               f"{' --data-dir ' + data_dir if data_dir else ''}`.\n\n" + markdown_table(header, cells))
        console.print(f"written: {out}")
    return rows


# ---------------------------------------------------------------- fedssl bench compare


def machine_description() -> str:
    import os
    import platform

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
            + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))


def run_compare(console: Console, *, preset: str, data_dir: str, runs: Path, docs: Path, extra: list[str],
                reliability: bool = True, only: Sequence[str] = (), page_only: bool = False, jobs: int = 1) -> Path:
    """Run (or continue) every setting of a comparison preset, then write docs/RESULTS.md and its plots.

    ``extra``: ``--set`` overrides applied last to every setting (they win over the preset's values);
    ``only``: key patterns of the settings to run (:func:`fedssl.compare.select_settings`; () = all);
    ``page_only``: run nothing: the page of the settings already finished, naming those still to run;
    ``jobs``: settings trained at once, each in its own process (the reliability checks run beside them).
    """
    from fedssl.compare import COMPARE_PRESETS, build_grid, finished_settings, run_comparison, select_settings
    from fedssl.engines.local import resolve_device
    from fedssl.errors import FedSSLError
    from fedssl.io import atomic_write_text
    from fedssl.run_pool import check_jobs

    if preset not in COMPARE_PRESETS:
        raise FedSSLError(f"unknown comparison preset {preset!r}; choose one of {', '.join(COMPARE_PRESETS)}")
    check_jobs(jobs)
    spec = COMPARE_PRESETS[preset]
    settings = select_settings(build_grid(spec, [*([f"data_dir={data_dir}"] if data_dir else []), *extra]), only)
    resolve_device(settings[0].config().device)  # before any run: one clear line where the device is not here
    started = time.perf_counter()
    pending: list[str] = []
    if page_only:
        done = finished_settings(settings, runs)
        pending = [s.key for s in settings if s not in done]
        if not done:
            raise FedSSLError(f"no setting of {preset} has finished in {runs}; run it without --page-only first")
        settings = done

    reused = len(finished_settings(settings, runs))

    def progress(index: int, setting: Any) -> None:
        console.print(f"[{index + 1}/{len(settings)}] {setting.label} — {setting.group or 'pooled data'} "
                      f"(seed {setting.config().seed}) [dim]{time.perf_counter() - started:.0f} s[/dim]")

    def finished(index: int, setting: Any, seconds: float) -> None:
        if jobs > 1:  # with one job the run's own progress shows its end
            console.print(f"[dim]done [{index + 1}/{len(settings)}] {setting.key} in {seconds:.0f} s "
                          f"({time.perf_counter() - started:.0f} s in all)[/dim]")

    checks = _start_reliability(console, jobs) if reliability and not page_only and not spec.fleets_only else None
    rows = run_comparison(settings, runs, progress, jobs=jobs, finished=finished)
    atomic_write_text(runs / "rows.json", json.dumps(rows, indent=1))
    command = shlex.join(["fedssl", "bench", "compare", "--preset", preset,
                          *(["--data-dir", data_dir] if data_dir else []), *(["--jobs", str(jobs)] if jobs > 1 else []),
                          *(a for p in only for a in ("--only", p)), *(a for e in extra for a in ("--set", e))])
    section = _reliability_section(console, runs, checks) if checks is not None else ""
    minutes = (time.perf_counter() - started) / 60
    wall = "" if page_only else (f"This call took {minutes:.0f} min of wall time with {jobs} run(s) at once: it "
                                 f"trained {len(settings) - reused} of the {len(settings)} settings and read "
                                 f"{reused} back from an earlier call"
                                 + (", and ran the reliability checks" if checks is not None else "") + ". ")
    if spec.fleets_only:
        out = _write_fleet_page(spec, rows, docs, command=command, wall=wall, pending=pending)
    else:
        out = _write_results_page(spec, rows, docs, command=command, reliability=section, pending=pending, wall=wall)
    console.print(f"written: {out} ({len(rows)} runs, {len(pending)} pending, {minutes:.1f} min)")
    return out


def _start_reliability(console: Console, jobs: int) -> Any:
    """The reliability checks (:func:`fedssl.reliability.run_checks`), started now: beside the runs in a thread
    when ``jobs`` > 1 (each check is its own fedssl processes), else returned to run after them."""
    from concurrent.futures import ThreadPoolExecutor

    from fedssl.reliability import run_checks

    def report(name: str) -> None:
        console.print(f"[dim]reliability: {name} ...[/dim]")

    if jobs == 1:
        return lambda: run_checks(report)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reliability")
    future = pool.submit(run_checks, report)
    pool.shutdown(wait=False)
    return future.result


def _reliability_section(console: Console, runs: Path, outcome: Callable[[], list[Any]]) -> str:
    """The reliability checks' outcome (``outcome()`` runs or awaits them), kept as JSON beside the runs; the
    page's section."""
    import datetime

    from fedssl.io import atomic_write_text
    from fedssl.reliability import checks_to_json, reliability_section

    checks = outcome()
    atomic_write_text(runs / "reliability.json", checks_to_json(checks))
    return reliability_section(checks, datetime.date.today().isoformat())


def _write_fleet_page(spec: Any, rows: list[dict[str, Any]], docs: Path, *, command: str, wall: str,
                      pending: Sequence[str] = ()) -> Path:
    """docs/FLEETS.md: the fleet section of a fleets-only preset (its tables, winners and plots); ``pending``:
    the settings not finished yet (a partial page says so first)."""
    import datetime

    from fedssl.fleet_page import fleet_section
    from fedssl.io import atomic_write_text
    from fedssl.results_page import pending_note

    text = (f"# Fleets: every federated method on simulated devices\n\nPreset `{spec.name}`: {spec.description}. "
            f"Measured {datetime.date.today().isoformat()} on {machine_description()} by `{command}`. {wall}\n\n"
            + pending_note(len(rows), pending) + fleet_section(spec.fleets, rows, docs))
    out = docs / "FLEETS.md"
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out


def _write_results_page(spec: Any, rows: list[dict[str, Any]], docs: Path, *, command: str, reliability: str,
                        pending: Sequence[str], wall: str = "") -> Path:
    """docs/RESULTS.md and its two plots (accuracy vs client memory and vs communication) from the rows."""
    import datetime

    from fedssl.fleet_page import fleet_section
    from fedssl.io import atomic_write_text
    from fedssl.results_page import fold_seeds, plot_tradeoff, render_results_page

    fleet_rows = [r for r in rows if r.get("fleet")]
    rows = [r for r in rows if not r.get("fleet")]
    folded = fold_seeds(rows)
    title = f"{spec.name}: {spec.headline}"
    plots = [plot_tradeoff(folded, "memory", "client peak training memory (MiB, measured on a real step)",
                           docs / "results" / "accuracy-vs-memory.png", title, spec.headline),
             plot_tradeoff(folded, "comm", "MiB up + down per client over the run",
                           docs / "results" / "accuracy-vs-communication.png", title, spec.headline)]
    text = render_results_page(spec, rows, when=datetime.date.today().isoformat(), machine=machine_description(),
                               command=command, plots=[str(p.relative_to(docs)) for p in plots],
                               reliability=reliability, pending=pending, wall=wall)
    text += "\n" + fleet_section(spec.fleets, fleet_rows, docs)
    out = docs / "RESULTS.md"
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out
