"""The command line: ``fedssl run | eval | finetune | export | report | attack | bench``.

Every error a user can cause prints one line (``fedssl: error: ...``) that names
the fix and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedssl.config import InversionConfig, RunConfig, load_toml, make_config, method_rules
from fedssl.errors import FedSSLError
from fedssl.resources import human_bytes, human_flops

EXIT_USER_ERROR = 2


class RichObserver:
    """One progress bar per round: clients done, loss, images/s and bytes sent so far."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console = console
        self.rounds = rounds
        self.progress = Progress(
            TextColumn("round {task.fields[round]:>3}/" + str(rounds)), BarColumn(bar_width=24),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[ips]:>6.0f} img/s"), TextColumn("sent {task.fields[sent]}"),
            TextColumn("{task.fields[knn]}"), TimeElapsedColumn(), console=console)
        self.task: Any = None
        self._start = 0.0
        self._images = 0
        self._loss: list[float] = []
        self._sent = 0

    def __enter__(self) -> "RichObserver":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def round_started(self, round_index: int, num_clients: int) -> None:
        self._start, self._images, self._loss, self._sent = time.perf_counter(), 0, [], 0
        self.task = self.progress.add_task("", total=num_clients, round=round_index + 1, loss=float("nan"),
                                           ips=0.0, sent="0 B", knn="")

    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None:
        self._images += int(metrics.get("images", 0))
        self._sent += int(metrics.get("bytes_up", 0) + metrics.get("bytes_down", 0))
        if metrics.get("steps"):
            self._loss.append(metrics["loss"])
        seconds = max(time.perf_counter() - self._start, 1e-9)
        loss = sum(self._loss) / len(self._loss) if self._loss else float("nan")
        self.progress.update(self.task, advance=1, loss=loss, ips=self._images / seconds,
                             sent=human_bytes(self._sent))

    def round_done(self, row: dict[str, Any]) -> None:
        knn = f"kNN {100 * row['knn_acc']:.1f}%" if row.get("knn_acc") is not None else ""
        self.progress.update(self.task, loss=row["loss"], ips=row["images_per_s"],
                             sent=human_bytes(row["bytes_up"] + row["bytes_down"]), knn=knn)

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]")


class QuietObserver:
    """A line per round, for logs and CI."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None:
        knn = f" knn={row['knn_acc']:.4f}" if row.get("knn_acc") is not None else ""
        self.console.print(f"round {row['round']} loss={row['loss']:.4f} img/s={row['images_per_s']:.0f} "
                           f"sent={human_bytes(row['bytes_up'] + row['bytes_down'])}{knn}")

    def message(self, text: str) -> None:
        self.console.print(text)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def result_table(title: str, initial: dict[str, Any], final: dict[str, Any]) -> Table:
    """Raw pixels / random init / trained / difference (``fedssl.report.result_rows``), the verdict as caption."""
    from fedssl.report import RESULT_HEADER, learning_verdict, result_rows

    table = Table(title=title, caption=learning_verdict(initial, final).replace("**", "") or None)
    for i, name in enumerate(RESULT_HEADER):
        table.add_column(name, justify="right" if i else "left")
    for row in result_rows(initial, final):
        table.add_row(*row)
    return table


def summary_table(outcome: Any) -> Table:
    """The short result a person reads at the end of a run."""
    from fedssl.report import client_cost

    table = result_table(str(outcome.run.path), outcome.initial, outcome.final)
    cost = client_cost(outcome.ledger)
    if cost is not None:
        table.add_section()
        for label, value in (("client peak training memory", human_bytes(cost.peak_training_bytes)),
                             ("client FLOPs per image (train step)", human_flops(cost.flops_per_image)),
                             ("bytes up per client per round", human_bytes(cost.mean_up_per_round)),
                             ("bytes down per client per round", human_bytes(cost.mean_down_per_round)),
                             ("bytes up+down per client, whole run", human_bytes(cost.mean_total_per_client))):
            table.add_row(label, "", "", value, "")
    if outcome.metrics and "sim_seconds_total" in outcome.metrics[-1]:
        from fedssl.devices.report import human_seconds

        table.add_row("simulated time on the fleet (devices)", "", "",
                      human_seconds(outcome.metrics[-1]["sim_seconds_total"]), "")
    return table


def _default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.method}-{cfg.dataset}-{datetime.now():%Y%m%d-%H%M%S}"


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from fedssl.engines import resume, start

    if args.resume and (args.config or args.method or args.set or args.out or args.engine):
        raise FedSSLError("--resume continues a run with its own config.toml on its own engine; "
                          "drop --config/--method/--set/--out/--engine")
    if args.resume:
        from fedssl.run_dir import open_run_dir

        _, cfg = open_run_dir(args.resume)
        path = Path(args.resume)
    else:
        base = load_toml(args.config) if args.config else {}
        cfg = make_config(base, args.set or [], method=args.method)
        path = Path(args.out) if args.out else _default_out(cfg)
    console.print(f"[bold]fedssl[/bold] {cfg.method} on {cfg.dataset}: {cfg.clients} clients "
                  f"({cfg.partition}), {cfg.rounds} rounds -> {path}")
    engine = args.engine or "local"
    if args.quiet or not console.is_terminal:
        observer: Any = QuietObserver(console)
        outcome = resume(path, observer=observer) if args.resume else start(cfg, path, engine=engine,
                                                                             observer=observer)
    else:
        with RichObserver(console, cfg.rounds) as observer:
            outcome = resume(path, observer=observer) if args.resume else start(cfg, path, engine=engine,
                                                                                 observer=observer)
    console.print(summary_table(outcome))
    console.print(f"report: {outcome.run.report}")
    return 0


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from fedssl.engines.local import evaluate_run

    result = evaluate_run(args.run_dir, probe=not args.no_probe)
    initial = {**result["random_init"], "pixels": result["pixels"]}
    console.print(result_table(f"{args.run_dir}: the final encoder, frozen", initial, result))
    console.print_json(json.dumps(result))
    console.print(f"[dim]written to {Path(args.run_dir) / 'eval.json'}[/dim]")
    return 0


def cmd_finetune(args: argparse.Namespace, console: Console) -> int:
    from fedssl.engines.local import finetune_run

    if (args.epochs is not None and args.epochs < 1) or (args.lr is not None and args.lr <= 0):
        raise FedSSLError("--epochs must be >= 1 and --lr > 0; e.g. fedssl finetune RUN_DIR --epochs 10 --lr 1e-3")
    console.print(f"[dim]fine-tuning the final encoder of {args.run_dir} with a linear head ...[/dim]")
    result = finetune_run(args.run_dir, epochs=args.epochs, lr=args.lr)
    console.print(f"fine-tuned {result['epochs']} epochs: test accuracy {100 * result['test_acc']:.2f}% "
                  f"(train {100 * result['train_acc']:.2f}%); written to {Path(args.run_dir) / 'finetune.json'}")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from fedssl.engines.local import export_run
    from fedssl.export import LOADERS, format_of

    shape = export_run(args.run_dir, args.out)
    fmt = format_of(args.out)
    console.print(f"wrote {args.out}: {fmt}, input (N, {', '.join(map(str, shape))}) float in [0, 1] -> features; "
                  f"load with {LOADERS[fmt]}")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from fedssl.report import regenerate_report

    console.print(f"wrote {regenerate_report(args.run_dir)}")
    return 0


def cmd_attack(args: argparse.Namespace, console: Console) -> int:
    """``fedssl attack RUN_DIR``: the split inversion attack (``fedssl.privacy.inversion``); flags left out keep
    ``InversionConfig``'s defaults."""
    from dataclasses import replace

    from fedssl.privacy.inversion import attack_run

    given = {k: (tuple(v) if k == "cuts" else v) for k in ("cuts", "steps", "images")
             if (v := getattr(args, k)) is not None}
    console.print(f"[dim]inverting the cut-layer activations of {args.run_dir} ...[/dim]")
    result = attack_run(args.run_dir, replace(InversionConfig(), **given))
    table = Table(title=f"what a split server can see ({result['client_images']} client images; "
                        f"floor {result['floor']['psnr']:.2f} dB)")
    for name in ("cut", "client memory", "PSNR trained", "SSIM trained", "PSNR random init", "SSIM random init"):
        table.add_column(name, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["cut"]), human_bytes(r["client_peak_training_bytes"]), f"{r['trained']['psnr']:.2f} dB",
                      f"{r['trained']['ssim']:.3f}", f"{r['random_init']['psnr']:.2f} dB",
                      f"{r['random_init']['ssim']:.3f}")
    console.print(table)
    console.print(f"wrote {Path(args.run_dir) / 'inversion.json'} and {Path(args.run_dir) / result['figure']}")
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from fedssl.bench import run_compare, run_overhead_benchmark

    if args.name == "compare":
        runs = Path(args.runs) if args.runs else Path("runs") / f"compare-{args.preset}"
        run_compare(console, preset=args.preset, data_dir=args.data_dir, runs=runs, docs=Path(args.docs),
                    extra=args.set or [], reliability=not args.no_reliability, only=args.only or [],
                    page_only=args.page_only, jobs=args.jobs)
        return 0
    run_overhead_benchmark(console, data_dir=args.data_dir)
    return 0


def _add_run_command(sub: argparse._SubParsersAction) -> None:
    """``fedssl run``: start or resume a pre-training."""
    run = sub.add_parser("run", help="run a (new or resumed) federated pre-training")
    run.add_argument("--config", help="a TOML preset, e.g. configs/cifar10/fedmoco.toml")
    run.add_argument("--method", help=f"one of {', '.join(method_rules().names)}")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", help="run directory to create (default runs/<method>-<dataset>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    run.add_argument("--engine", choices=["local", "flower"],
                     help="local: clients simulated in this process (default); flower: Flower's simulation runtime "
                          "(one virtual SuperNode per client; see README, Flower)")
    run.add_argument("--quiet", action="store_true", help="one line per round instead of progress bars")
    run.set_defaults(func=cmd_run)


def _add_run_dir_commands(sub: argparse._SubParsersAction) -> None:
    """``fedssl eval | finetune | export | report RUN_DIR``: what is done with a finished run."""
    ev = sub.add_parser("eval", help="kNN and linear probe of a run's final encoder")
    ev.add_argument("run_dir")
    ev.add_argument("--no-probe", action="store_true", help="kNN only")
    ev.set_defaults(func=cmd_eval)

    ft = sub.add_parser("finetune", help="fine-tune the final encoder + a linear head on the labelled train split")
    ft.add_argument("run_dir")
    ft.add_argument("--epochs", type=int, help="epochs (default: the run's eval.finetune_epochs)")
    ft.add_argument("--lr", type=float, help="AdamW learning rate (default: the run's eval.finetune_lr)")
    ft.set_defaults(func=cmd_finetune)

    from fedssl.export import EXPORT_SUFFIX, LOADERS

    ex = sub.add_parser("export", help="write the final encoder as a module that loads with torch alone",
                        description="Write a finished run's final encoder: [0, 1] images (N, C, H, W) at the "
                                    "training resolution in, features (N, D) out, normalisation inside. The suffix "
                                    f"of --out picks the format: {EXPORT_SUFFIX} = torch.export (load with "
                                    f"{LOADERS['torch.export']}), any other = TorchScript (load with "
                                    f"{LOADERS['TorchScript']}).")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help=f"file to write: encoder.pt (TorchScript) or encoder{EXPORT_SUFFIX} "
                                                 "(torch.export)")
    ex.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="rewrite report.md and plots of a finished run")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)


def _add_attack_command(sub: argparse._SubParsersAction) -> None:
    """``fedssl attack RUN_DIR``: the split inversion attack on a finished split run."""
    default = InversionConfig()
    att = sub.add_parser("attack", help="invert a split run's cut-layer activations: what its server can see",
                         description="Train a decoder from the client layers' activations back to images on the "
                                     f"server's own images (the first {default.aux_share:.0%} of the test split), "
                                     "decode the clients' training images, score PSNR / SSIM per cut; writes "
                                     "inversion.json, inversion.png and the report's section.")
    att.add_argument("run_dir")
    att.add_argument("--cuts", type=int, nargs="+",
                     help=f"client-side depths to attack (default {' '.join(map(str, default.cuts))})")
    att.add_argument("--steps", type=int, help=f"decoder training steps per cut (default {default.steps})")
    att.add_argument("--images", type=int,
                     help=f"clients' training images reconstructed and scored (default {default.images})")
    att.set_defaults(func=cmd_attack)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    """``fedssl bench overhead | compare``."""
    bench = sub.add_parser("bench", help="benchmarks that print comparison tables")
    bench.add_argument("name", choices=["overhead", "compare"],
                       help="overhead: centralized vs federated images/s and memory; compare: every method on the "
                            "same data, written to docs/RESULTS.md (resumable)")
    bench.add_argument("--data-dir", default="", help="folder with cifar-10-batches-py (default: the cache)")
    bench.add_argument("--preset", default="cpu", help="compare: cpu (49 runs; see README for its time on 2 cores), "
                                                       "cpu-fleets (20 runs on simulated devices) or "
                                                       "gpu-paper (the papers' scale, for a GPU)")
    bench.add_argument("--runs", help="compare: folder of its run directories (default runs/compare-<preset>); "
                                      "run again to continue a killed comparison")
    bench.add_argument("--docs", default="docs", help="compare: where RESULTS.md (FLEETS.md for cpu-fleets) and "
                                                      "its plots go")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="compare: override for every run "
                       "(applied last: it wins over the preset's values)")
    bench.add_argument("--only", action="append", metavar="PATTERN", help="compare: run only the settings whose "
                       "folder name matches (shell pattern, repeatable), e.g. 'centralized-*-s0' "
                       "'fedmoco-v2-dirichlet-0-5-10c-s0'")
    bench.add_argument("--jobs", type=int, default=1, help="compare: settings trained at once, each in its own "
                       "process with the cores shared out (e.g. 2 on a 2-core machine); the results do not depend "
                       "on it where threads is set (--set threads=1)")
    bench.add_argument("--no-reliability", action="store_true", help="compare: skip the reliability checks")
    bench.add_argument("--page-only", action="store_true", help="compare: run nothing; write the page of the "
                       "settings already finished and name those still to run")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedssl`` parser: every subcommand, in the order ``--help`` lists them."""
    from fedssl.engines.flower.deploy import add_deploy_commands

    parser = argparse.ArgumentParser(prog="fedssl", description="Federated self-supervised pre-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_command(sub)
    _add_run_dir_commands(sub)
    _add_attack_command(sub)
    add_deploy_commands(sub)
    _add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return int(args.func(args, console))
    except FedSSLError as err:
        print(f"fedssl: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedssl: interrupted; continue with fedssl run --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
