"""The floor beside every accuracy of a benchmark table, and the rules its verdicts follow.

Shared by mocosfl_accuracy.py, layerwise_accuracy.py and fedmae_accuracy.py. A row is what
:func:`fedssl.compare.summarize_run` reads off a finished run directory: ``knn`` / ``probe`` of the
FINAL encoder, ``knn_init`` / ``probe_init`` of the random-init encoder of the same final
architecture (scored before the first round) and ``knn_pixels`` / ``probe_pixels`` of the
normalised raw pixels, all with the same kNN and linear probe on the test split.

The rules (the project's, as docs/RESULTS.md applies them): a run *learned measurably* when its
kNN gain over random init is at least 2 points; a row is only a reference when it learned, and a
ceiling only when it gained at least 10 kNN points. A comparison with a reference that did not
learn gets no verdict.
"""

from __future__ import annotations

import datetime
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from fedssl.bench import machine_description
from fedssl.results_page import MIN_CEILING_GAIN, MIN_LEARNED_GAIN, learned_measurably

Row = Mapping[str, Any]
LEARNED_GAIN = MIN_LEARNED_GAIN  # the project's rule (fedssl.results_page.learned_measurably)
CEILING_GAIN = MIN_CEILING_GAIN  # a ceiling gains at least this over its random init, or it is no ceiling
SCORE_NAMES = {"knn": "kNN", "probe": "probe"}
FLOOR_NOTE = ("Beside every accuracy: raw pixels (the normalised images, average-pooled to at most 32x32) and the "
              "random-init encoder of the same FINAL architecture (built from the run's seed, scored before the "
              "first round), with the same kNN and probe; the difference is trained - random init in points. The "
              f"rules of the verdicts: a run learned measurably when its kNN gain is above {100 * LEARNED_GAIN:.0f} "
              f"points, a ceiling is a reference only when it gained >= {100 * CEILING_GAIN:.0f}, and no verdict "
              "compares with a reference that did not learn.")
NOISE_NOTE = ("One seed, one run per setting: 1,017 test images give one run's accuracy a binomial std of about 1.4 "
              "points, so differences of a point or two are noise. Wall and training times are of the machine as it "
              "was during the run (this project's 2-core machine is shared with other jobs): they are not a speed "
              "comparison (the measured per-client costs are).")


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def gain(row: Row, score: str = "knn") -> float | None:
    """Trained - random init of ``score`` ("knn" or "probe"); None where either is missing."""
    trained, init = row.get(score), row.get(f"{score}_init")
    return None if trained is None or init is None else trained - init


def learned(row: Row) -> bool:
    """One run learned measurably: its kNN gain over random init clears 2 points (one seed: no spread)."""
    return learned_measurably(gain(row))


def floor_header(scores: Sequence[str] = ("knn", "probe")) -> list[str]:
    """Per score: raw pixels, random init, trained, trained - random init."""
    return [f"{SCORE_NAMES[s]}: {part}" for s in scores
            for part in ("raw pixels", "random init", "trained", "trained - random init")]


def floor_cells(row: Row, scores: Sequence[str] = ("knn", "probe")) -> list[str]:
    return [cell for s in scores
            for cell in (pct(row.get(f"{s}_pixels")), pct(row.get(f"{s}_init")), pct(row.get(s)), points(gain(row, s)))]


def learning_line(label: str, row: Row) -> str:
    """Whether a row learned measurably, and whether it ends below raw pixels."""
    value = gain(row)
    if value is None:
        return f"- {label}: no random-init score recorded."
    word = "learned measurably" if learned(row) else "**did not learn measurably**"
    text = f"- {label}: {points(value)} kNN points over random init ({points(gain(row, 'probe'))} probe): {word}."
    pixels = row.get("knn_pixels")
    if pixels is not None and row["knn"] < pixels:
        text += f" Ends below raw pixels ({pct(row['knn'])} vs {pct(pixels)} kNN)."
    return text


def comparison_line(claim: str, a: tuple[str, Row], b: tuple[str, Row], *, margin: float = 0.0,
                    ceiling: bool = False) -> str:
    """``claim`` read as kNN(a) - kNN(b) >= -margin; a verdict only where both learned measurably and, when ``b`` is
    a ceiling, ``b`` gained at least :data:`CEILING_GAIN`."""
    (label_a, row_a), (label_b, row_b) = a, b
    diff = row_a["knn"] - row_b["knn"]
    measured = f"{pct(row_a['knn'])} vs {pct(row_b['knn'])}, difference {points(diff)} points"
    flat = [f"{label} ({points(gain(row))} points)" for label, row in (a, b) if not learned(row)]
    if flat:
        return (f"- {claim}: {measured}: **no verdict**: {' and '.join(flat)} did not learn measurably, so the "
                "difference says nothing about the methods.")
    if ceiling and (gain(row_b) or 0.0) < CEILING_GAIN:
        return (f"- {claim}: {measured}: **no verdict**: the ceiling {label_b} gained only {points(gain(row_b))} "
                f"points over its random init (a ceiling must gain >= {100 * CEILING_GAIN:.0f}).")
    held = diff >= -margin
    close = " (within single-run noise of the margin)" if abs(diff + margin) <= 0.02 else ""
    return f"- {claim}: {measured}: **{'holds' if held else 'does not hold'}**{close}."


def command_of(script: str, argv: Sequence[str]) -> str:
    """The command line as run: niceness and OMP_NUM_THREADS where set, the script, its arguments."""
    prefix = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    prefix += [f"nice -n {os.nice(0)}"] if os.nice(0) > 0 else []
    return " ".join([*prefix, "python", f"benchmarks/{script}", *([shlex.join(argv)] if argv else [])])


def measured_line(script: str, argv: Sequence[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine_description()} by `{command_of(script, argv)}`."


__all__ = ["CEILING_GAIN", "FLOOR_NOTE", "LEARNED_GAIN", "NOISE_NOTE", "comparison_line", "command_of", "floor_cells",
           "floor_header", "gain", "learned", "learning_line", "measured_line", "pct", "points"]
