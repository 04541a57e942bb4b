"""What client-level DP costs in accuracy: FedMoCo's kNN against epsilon, without DP, clipping only, three noise levels.

    OMP_NUM_THREADS=1 python benchmarks/dp_accuracy.py --threads 1 --runs runs/dp-accuracy  # 15 runs, ~90 min
    OMP_NUM_THREADS=1 python benchmarks/dp_accuracy.py --quick --threads 1  # a few minutes: proves it works

The recipe is the cpu comparison's FedMoCo v2 setting, built as ``fedssl bench compare --preset cpu`` builds it
(``fedssl.compare``: the preset's ResNet base config, the "Dirichlet 0.5, 10 clients" block, the FedMoCo v2
MethodSpec, ``seed``): ResNet-10 width 16 with GroupNorm, Dirichlet 0.5 over 10 clients, ALL 10 clients every
round (sample fraction 1), 8 rounds of one local epoch, batch 32, SGD lr 0.06 with a cosine decay over the rounds.
That setting learns: +6.78 +- 3.00 kNN points over random init in three seeds (docs/RESULTS.md). The only
additions are ``eval.probe = false`` (this benchmark reads kNN only; the probe runs after training and changes no
weight) and, per row, the ``[privacy]`` keys. Rows, each over seeds 0, 1, 2:

- no DP: the plain setting (``privacy.enabled = false``: FedAvg weighted by data size);
- clipping only (z = 0): DP-FedAvg without noise: every update clipped to ``CLIP``, the uniform average over the 10
  sampled clients (README "Privacy"). Against the no-DP row this is what clipping (and DP-FedAvg's uniform weights)
  costs, with no noise;
- z = 0.01, z = 0.05 and z = 3 (epsilon 10): the same plus Gaussian noise of std z x ``CLIP`` on the sum of the 10
  updates.

Why clip norm 1.0 (``CLIP``), measured before any row ran: one round of the no-clip setting (seed 0, round 0, the
largest learning rate) gave client update norms (upload - download, all 373,456 exchanged floats as one vector)
of 0.48 to 2.35, median 1.48, close to proportional to the client's local steps (6 to 30: Dirichlet sizes of 190
to 946 images). The cosine schedule brings the learning rate to 85% / 50% / 15% of its start in rounds 2 / 4 / 6,
and the updates shrink with it, so a bound of 1.0 scales down about 7 of 10 updates in the first rounds and none
in the last ones (about a third of all updates if the norms follow the learning rate): it cuts the largest
updates without scaling nearly all of them, so the clipping-only row is not a different, shrunk-step recipe.
The table's "clipped updates" column and the per-round counts under it are what the runs measured: 51% of all
updates in the clipping-only row (8.7, 10, 8, 8.7, 4.3, 1.3, 0, 0 of 10 in rounds 1 to 8, mean of three seeds),
more than that estimate: the norms grew after the first round and fell more slowly than the learning rate.

Why z = 0.01, 0.05 and 3, chosen from the noise-to-signal ratio only, before any accuracy: one round's noise on the
AVERAGE has norm z x C x sqrt(d) / m (d = 373,456 floats, m = 10 clients), against the clip bound C, the
largest norm the average of the clipped updates can have; the ratio z x sqrt(d) / m = 61 z does not depend on C.
z = 0.01 puts the noise at 0.61 of the bound (below the largest possible signal: DP that should barely be
felt); z = 0.05 at 3.1 times the bound (noise a few times the largest possible update each round). The old
benchmark's z = 1 (66x the bound) left weights that were mostly noise. z = 3 is the row at a guarantee people
call meaningful: epsilon = 10 after 8 rounds of all 10 clients (183x the bound), run so that what DP at that
epsilon does to this setting is measured, not argued.

Every figure is of a real ``fedssl.engines.local`` run on the real CIFAR-10 subset (``--data-dir``, default
../shared/data): the FINAL encoder's kNN on the test split (mean +- sample std over the seeds) beside the
random-init encoder and raw pixels of the same seeds, epsilon at ``privacy.delta`` = 1e-5 after the run (dp-
accounting's RDP; with every client in every round there is no sampling amplification: the accountant composes
the plain Gaussian mechanism, which it does for sample size = population), and the share of updates clipped.
``--runs DIR`` keeps the run directories; a run whose final.json exists is read back, an interrupted one is
resumed from its checkpoint (``fedssl.compare.ensure_run``), so a killed benchmark continues where it stopped.
The page is rewritten (atomically) after every run: an unfinished benchmark shows what has finished. Written to
benchmarks/results/dp_accuracy.md (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.compare import COMPARE_PRESETS, Setting, build_grid, ensure_run, summarize_run  # noqa: E402
from fedssl.io import atomic_write_text  # noqa: E402
from fedssl.privacy.dp import clients_per_round  # noqa: E402
from fedssl.results_page import learned_measurably  # noqa: E402
from fedssl.run_dir import RunDir, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET, BLOCK, METHOD = "cpu", "Dirichlet 0.5, 10 clients", "FedMoCo v2"  # the cpu comparison's setting
CLIP, DELTA = 1.0, 1e-5
DP_KEYS = [f"privacy.clip_norm={CLIP:g}", f"privacy.delta={DELTA:g}", "privacy.reproducible_noise=true"]
QUICK = ["clients=4", "rounds=2", "local_steps=1", "batch_size=16", "model.width=8", "eval.knn_k=20"]
NOISE: tuple[float | None, ...] = (None, 0.0, 0.01, 0.05, 3.0)  # None: no DP; 0: clipping only; 3: epsilon 10
SEEDS = (0, 1, 2)
MEANINGFUL_EPSILON = 10.0  # the loosest epsilon usually called a meaningful guarantee


def noise_arg(text: str) -> float | None:
    """A ``--noise`` value: ``off`` (no DP) or a noise multiplier >= 0."""
    return None if text.lower() in ("off", "none", "nodp") else float(text)


def row_name(noise: float | None) -> str:
    return "no DP" if noise is None else ("clipping only" if noise == 0 else f"DP, z = {noise:g}")


def setting(noise: float | None, seed: int, args: argparse.Namespace) -> Setting:
    """The cpu comparison's FedMoCo v2 run of ``seed`` (its exact config), plus this row's privacy keys."""
    extra = [f"data_dir={args.data_dir}", f"threads={args.threads}", "eval.probe=false",
             *(QUICK if args.quick else []), *args.set]
    base = next(s for s in build_grid(COMPARE_PRESETS[PRESET], extra)
                if s.label == METHOD and s.group == BLOCK and s.config().seed == seed)
    privacy = (["privacy.enabled=false"] if noise is None else
               ["privacy.enabled=true", *DP_KEYS, f"privacy.noise_multiplier={noise:g}"])
    key = "nodp" if noise is None else f"z{noise:g}"
    return dataclasses.replace(base, key=f"{key}-seed{seed}", overrides=(*base.overrides, *privacy))


def run_one(noise: float | None, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """One real run (read back if finished, resumed if interrupted): final kNN, baselines, epsilon, clipping."""
    spec = setting(noise, seed, args)
    path = ensure_run(spec, runs)
    summary, cfg = summarize_run(path), spec.config()
    metrics = read_jsonl(RunDir(path).metrics)
    m = clients_per_round(cfg.sample_fraction, cfg.clients)
    floats = metrics[0]["bytes_up"] / (metrics[0]["clients"] * 4)  # float32 values a client uploads
    return {"noise": noise, "seed": seed, "knn": summary["knn"], "init": summary["knn_init"],
            "pixels": summary["knn_pixels"], "seconds": summary["train_seconds"], "cfg": cfg, "m": m,
            "epsilon": metrics[-1].get("epsilon"), "floats": floats,
            "noise_to_bound": None if noise is None else noise * math.sqrt(floats) / m,
            "clipped_per_round": [int(r["clipped"]) for r in metrics] if noise is not None else None}


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float], signed: bool = False) -> str:
    """mean +- std (sample std over the seeds) in percent (points)."""
    text = f"{100 * mean(values):+.2f}" if signed else f"{100 * mean(values):.2f}"
    return text + (f" ± {100 * std(values):.2f}" if len(values) > 1 else "")


def eps_text(value: float | None) -> str:
    if value is None:
        return "— (no DP)"
    return "∞" if math.isinf(value) else f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def groups(rows: list[dict[str, Any]]) -> list[tuple[float | None, list[dict[str, Any]]]]:
    """The rows per noise level, in the order no DP, clipping only, then z ascending."""
    levels = sorted({r["noise"] for r in rows}, key=lambda z: -1.0 if z is None else z)
    return [(z, [r for r in rows if r["noise"] == z]) for z in levels]


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: raw pixels, random init, then one row per setting."""
    seeds = sorted({r["seed"] for r in rows})
    first = [next(r for r in rows if r["seed"] == s) for s in seeds]  # the baselines are per seed, not per noise
    lines = ["| setting | noise multiplier z | epsilon (delta 1e-5) | noise norm / clip bound | kNN (%) | "
             "trained - random init (points) | seeds | clipped updates | training wall per run |",
             "|---|---|---|---|---|---|---|---|---|",
             *(f"| {name} | — | — | — | {spread([r[key] for r in first])} | — | {len(first)} | — | — |"
               for name, key in (("raw pixels", "pixels"), ("random init", "init")))]
    for noise, group in groups(rows):
        gains = [r["knn"] - r["init"] for r in group]
        ratio = "—" if noise is None else f"{group[0]['noise_to_bound']:.2g}"
        shares = [mean(r["clipped_per_round"]) / r["m"] for r in group] if noise is not None else []
        clipped = f"{100 * mean(shares):.0f}%" if shares else "—"
        lines.append(f"| {row_name(noise)} | {'—' if noise is None else f'{noise:g}'} | "
                     f"{eps_text(group[0]['epsilon'])} | {ratio} | {spread([r['knn'] for r in group])} | "
                     f"{spread(gains, signed=True)} | {len(group)} | {clipped} | "
                     f"{mean([r['seconds'] for r in group]):.0f} s |")
    return "\n".join(lines) + "\n"


def clipping_lines(rows: list[dict[str, Any]]) -> str:
    """Per DP row: the clients whose update the bound scaled down, per round (mean over the seeds)."""
    out = []
    for noise, group in groups(rows):
        if noise is None:
            continue
        per_round = [mean(list(col)) for col in zip(*(r["clipped_per_round"] for r in group))]
        out.append(f"- {row_name(noise)}: " + ", ".join(f"{c:.1f}" for c in per_round)
                   + f" of {group[0]['m']} clients in rounds 1 to {len(per_round)}")
    return "\n".join(out) + "\n"


def paired(group: list[dict[str, Any]], plain: list[dict[str, Any]]) -> list[float]:
    """kNN of this row minus the no-DP row's, seed by seed (same partition, same initial weights)."""
    by_seed = {r["seed"]: r["knn"] for r in plain}
    return [r["knn"] - by_seed[r["seed"]] for r in group if r["seed"] in by_seed]


def z_for_epsilon(target: float, cfg: Any) -> float:
    """The noise multiplier whose epsilon after this run's rounds is ``target`` (bisection on the accountant)."""
    from fedssl.privacy.accountant import epsilon

    m = clients_per_round(cfg.sample_fraction, cfg.clients)
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon(mid, DELTA, cfg.rounds, m, cfg.clients) > target else (low, mid)
    return high


def row_verdict(noise: float, group: list[dict[str, Any]], plain: list[dict[str, Any]]) -> tuple[str, bool, bool]:
    """One DP row against no DP: its line, whether it costs kNN beyond the seed spread, whether it still learns."""
    knn, gains = [r["knn"] for r in group], [r["knn"] - r["init"] for r in group]
    learns = learned_measurably(mean(gains), std(gains))  # beyond 2 points and its own seed spread
    diffs = paired(group, plain)  # seed by seed: means over the same seeds even while a benchmark is unfinished
    costs = bool(diffs) and -mean(diffs) > max(std([r["knn"] for r in plain]), std(knn))
    line = (f"- {row_name(noise)} (epsilon {eps_text(group[0]['epsilon'])}): {spread(knn)}% kNN, "
            f"{spread(diffs, signed=True)} points against no DP (seed by seed, same partition and init): "
            + ("a cost BEYOND the seed spread (the drop exceeds both rows' std)" if costs else
               f"within the seed spread (no cost measurable with {len(group)} seeds)")
            + f"; {'still learns' if learns else 'does not learn beyond the seed spread'} "
              f"({spread(gains, signed=True)} points over random init).")
    return line, costs, learns


def epsilon_lines(rows: list[dict[str, Any]], learning_eps: list[float]) -> list[str]:
    """Whether a noised row that learns has a meaningful epsilon, and the noise epsilon = 10 would take."""
    cfg, m, floats = rows[0]["cfg"], rows[0]["m"], rows[0]["floats"]
    if learning_eps and min(learning_eps) <= MEANINGFUL_EPSILON:
        lines = [f"- The smallest epsilon of a noised row that still learns (its gain over random init beyond 2 "
                 f"points and its own seed spread): {eps_text(min(learning_eps))}, a meaningful guarantee; its line above says what "
                 "it costs against no DP."]
    elif learning_eps:
        lines = [f"- The smallest epsilon of a noised row that still learns: {eps_text(min(learning_eps))}, far "
                 f"above {MEANINGFUL_EPSILON:g} (the loosest bound usually called meaningful): with {m} clients a "
                 "round, every noise level that preserves learning gives NO meaningful privacy guarantee."]
    else:
        lines = ["- No noised row still learns beyond the seed spread."]
    z10 = z_for_epsilon(MEANINGFUL_EPSILON, cfg)
    lines.append(f"- For epsilon = {MEANINGFUL_EPSILON:g} after these {cfg.rounds} rounds the accountant needs z = "
                 f"{z10:.2f}: noise on the average {z10 * math.sqrt(floats) / m:.0f} times the clip bound each "
                 "round. The noise on the mean falls as 1 / (clients a round): at that z it would fall to the clip "
                 f"bound only with about {z10 * math.sqrt(floats):,.0f} clients a round (fewer where a larger "
                 "population lets sampling amplify the privacy).")
    return lines


def verdict(rows: list[dict[str, Any]]) -> str:
    """The answer, computed: a summary line, then each DP row against no DP (beyond the seed spread?), whether it
    still learns, and whether any epsilon of a row that learns is a meaningful guarantee."""
    plain = dict(groups(rows)).get(None)
    if not plain or len(plain) < 2:
        return "No verdict: the no-DP row needs at least two finished seeds.\n"
    plain_gains = [r["knn"] - r["init"] for r in plain]
    plain_learns = learned_measurably(mean(plain_gains), std(plain_gains))
    lines = [f"- no DP: {spread([r['knn'] for r in plain])}% kNN, {spread(plain_gains, signed=True)} points over "
             f"random init: {'learns' if plain_learns else 'does NOT learn beyond the seed spread'}."]
    learning_eps, costly, free = [], [], []
    for noise, group in groups(rows):
        if noise is None:
            continue
        line, costs, learns = row_verdict(noise, group, plain)
        lines.append(line)
        (costly if costs else free).append(f"{row_name(noise)} (epsilon {eps_text(group[0]['epsilon'])})")
        if learns and noise > 0:
            learning_eps.append(group[0]["epsilon"])
    lines += epsilon_lines(rows, learning_eps)
    if not costly and not free:
        summary = "no DP row has finished: nothing to compare with the no-DP row yet."
    elif not plain_learns:
        summary = "the no-DP row does not learn beyond the seed spread: this budget cannot show what DP costs."
    else:
        summary = ((f"no kNN cost beyond the seed spread for {'; '.join(free)}" if free else "")
                   + ("; " if free and costly else "")
                   + (f"a cost beyond the seed spread for {'; '.join(costly)}" if costly else "")
                   + (". No noise level that keeps learning gives a meaningful epsilon with "
                      f"{rows[0]['m']} clients a round." if learning_eps and min(learning_eps) > MEANINGFUL_EPSILON
                      else "."))
    return f"**Verdict: {summary[0].upper() + summary[1:]}**\n\n" + "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, planned: int) -> str:
    from fedssl.bench import machine_description

    cfg = rows[0]["cfg"]
    m = rows[0]["m"]
    head = ("# Client-level DP: kNN against epsilon on the real CIFAR-10 subset\n\n"
            f"Measured {datetime.date.today().isoformat()} on {machine_description()} by `{command}` "
            "(one process, nice 19).\n\n"
            f"The cpu comparison's FedMoCo v2 setting (docs/RESULTS.md: +6.78 ± 3.00 points over random init): "
            f"{cfg.clients} clients (partition {cfg.partition}, alpha {cfg.alpha}), all {m} of them every round, "
            f"{cfg.rounds} rounds of {cfg.local_epochs} local epoch, batch {cfg.batch_size}, {cfg.optimizer} lr "
            f"{cfg.lr:g} ({cfg.lr_schedule}), backbone {cfg.model.arch} width {cfg.model.width} ({cfg.model.norm} "
            f"norm), {rows[0]['floats']:,.0f} floats uploaded per client. No DP: FedAvg weighted by data size. DP "
            f"rows: each client's update clipped to L2 norm {CLIP:g}, Gaussian noise of std z x {CLIP:g} on the "
            f"sum of the {m} updates, divided by {m} (DP-FedAvg, README \"Privacy\"; z = 0: clipping only). "
            f"Epsilon at delta = {DELTA:g} after the run from dp-accounting (RDP, replace-one adjacency; every "
            "client every round, so no sampling amplification). FINAL encoders, kNN "
            f"(k = {cfg.eval.knn_k}) on frozen features of the test split; mean ± sample std over seeds "
            f"{sorted({r['seed'] for r in rows})} (random init and raw pixels: each seed's untrained encoder and "
            "the pixels). Why clip 1.0 and z = 0.01 / 0.05: benchmarks/dp_accuracy.py's docstring (chosen from "
            "measured update norms and the noise-to-bound ratio, before any accuracy).\n\n")
    if len(rows) < planned:
        head += f"**Unfinished: {len(rows)} of {planned} runs have finished; the table holds those.**\n\n"
    note = ("\nNoise norm / clip bound: the norm of one round's noise on the AVERAGE (z x clip x sqrt(floats "
            f"uploaded) / {m}) over the largest norm the average of the clipped updates can have (the clip bound). "
            "Clipped updates: the share of client updates the bound scaled down; per round (clients of "
            f"{m}, mean over the seeds):\n\n" + clipping_lines(rows)
            + "\nTraining wall: the rounds' wall time of one run on this machine as it was (others shared it); "
            "the kNN evaluations come on top.\n\n## Verdict\n\n" + verdict(rows))
    if args.quick:
        head = "**A smoke run (`--quick`): a tiny budget that proves the script works, not a measurement.**\n\n" + head
    return head + table(rows) + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny budget that proves it works")
    parser.add_argument("--noise", nargs="*", type=noise_arg, default=list(NOISE),
                        help="rows: 'off' (no DP) or noise multipliers (0 = clipping only)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dp_accuracy.md"))
    parser.add_argument("--runs", help="keep the run directories here and reuse finished ones (default: a "
                                       "temporary folder)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    command = "python benchmarks/dp_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    planned, start = len(args.seeds) * len(args.noise), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        for seed in args.seeds:  # seed by seed: an unfinished benchmark has whole seeds
            for noise in args.noise:
                rows.append(run_one(noise, seed, args, runs))
                print(f"{row_name(noise)} seed {seed}: kNN {100 * rows[-1]['knn']:.2f}%, epsilon "
                      f"{eps_text(rows[-1]['epsilon'])}, {time.perf_counter() - start:.0f} s so far",
                      file=sys.stderr, flush=True)
                atomic_write_text(args.out, render(rows, args, command.strip(), planned))
    text = render(rows, args, command.strip(), planned)
    print(text)
    atomic_write_text(args.out, text)
    print(f"total wall {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
