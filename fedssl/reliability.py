"""Reliability checks for the results page: what was tried, what happened, whether it held.

Each check runs a real (tiny) scenario end to end and records its outcome, whatever it is:
a run killed and resumed, a comparison re-entered, clients that drop out, a client whose
update is NaN, corrupt and degenerate data, and every bad-config case of the command line.
``fedssl bench compare`` runs them and writes the section into docs/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedssl.config import make_config
from fedssl.report import markdown_table

# A few seconds per run on 2 cores: a narrow ResNet on 512 synthetic images, 3 clients.
TINY: dict[str, Any] = {
    "dataset": "synthetic", "clients": 3, "rounds": 3, "local_steps": 3, "batch_size": 16, "partition": "iid",
    "threads": 1, "model": {"width": 8, "blocks_per_stage": [1, 1]},
    "ssl": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 64}, "eval": {"probe_epochs": 5, "knn_k": 20},
}


@dataclass(frozen=True)
class Check:
    what: str  # what was tried
    expected: str  # what must happen
    outcome: str  # what happened
    held: bool


def _tiny(*overrides: str):
    return make_config(TINY, list(overrides))


def _cli_env() -> dict[str, str]:
    """The environment of a ``fedssl`` process: this one's, with this very fedssl package first on the path."""
    import fedssl

    package_root = str(Path(fedssl.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run the command line as a user would (``fedssl ARGS`` in a new process); its exit status and stderr."""
    done = subprocess.run([sys.executable, "-m", "fedssl.cli", *argv], capture_output=True, text=True,
                          env=_cli_env(), timeout=600, check=False)
    return done.returncode, done.stderr.strip()


def _comparable(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_s")} for m in metrics]


def check_kill_and_resume(work: Path) -> Check:
    """SIGKILL a real `fedssl run` process after its first checkpoint; resume it; compare with a full run."""
    from fedssl.engines.local import resume_run, start_run
    from fedssl.run_dir import open_run_dir

    killed = work / "killed"
    args = ["--set=dataset=synthetic", "--set=clients=3", "--set=rounds=4", "--set=local_steps=4",
            "--set=batch_size=16", "--set=partition=iid", "--set=threads=1", "--set=model.width=8",
            "--set=model.blocks_per_stage=[1,1]", "--set=ssl.proj_hidden=32", "--set=ssl.proj_dim=16",
            "--set=ssl.queue_size=64", "--set=eval.probe_epochs=5", "--set=eval.knn_k=20", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "run", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_cli_env())
    try:
        checkpoint = killed / "checkpoints" / "last.pt"
        deadline = time.time() + 300
        while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    if (killed / "final.json").exists() or not (killed / "checkpoints" / "last.pt").exists():
        return Check("a run killed (SIGKILL) after its first checkpoint, then resumed", "the same metrics and "
                     "final accuracy as an uninterrupted run", "the run could not be killed mid-way", False)
    done = len([line for line in (killed / "metrics.jsonl").read_text().splitlines() if line.strip()])
    resumed = resume_run(killed)
    _, cfg = open_run_dir(killed)
    full = start_run(cfg, work / "uninterrupted")
    same = _comparable(resumed.metrics) == _comparable(full.metrics) and resumed.final == full.final
    outcome = (f"killed after round {done} of 4; resumed: metrics of every round and final kNN "
               f"{100 * resumed.final['knn_acc']:.2f}% / probe {100 * resumed.final['probe_acc']:.2f}% "
               + ("identical to the uninterrupted run" if same else "DIFFER from the uninterrupted run"))
    return Check("a run killed (SIGKILL) after its first checkpoint, then resumed",
                 "the same metrics and final accuracy as an uninterrupted run", outcome, same)


def check_comparison_reentered(work: Path) -> Check:
    """A comparison run twice: the second pass reads the finished runs back and runs nothing."""
    from fedssl.compare import Setting, run_comparison

    settings = [Setting("a", "FedMoCo", TINY, ("rounds=1",)), Setting("b", "FedBYOL", TINY, ("rounds=1", "method=fedbyol"))]
    first = run_comparison(settings, work / "compare")
    start = time.perf_counter()
    second = run_comparison(settings, work / "compare")
    seconds = time.perf_counter() - start
    same = first == second
    return Check("a comparison (`fedssl bench compare`) entered again after its runs finished",
                 "finished runs are read back, not rerun; the same rows",
                 f"second pass took {seconds:.2f} s; rows {'identical' if same else 'DIFFER'}", same and seconds < 10)


def check_dropout(work: Path, rate: float) -> Check:
    from fedssl.engines.local import start_run

    out = start_run(_tiny(f"dropout={rate}", "clients=8", "rounds=4", "local_steps=2"), work / f"dropout-{rate}")
    sent = 8 * 4
    dropped = sum(int(m.get("dropped", 0)) for m in out.metrics)
    uploads = sum(r["kind"] == "upload" for r in out.ledger.rows)
    held = uploads == sent - dropped and 0 < dropped < sent and math.isfinite(out.final["knn_acc"])
    return Check(f"{int(100 * rate)}% of the sampled clients fail to return their update (8 clients, 4 rounds)",
                 "every round aggregates the updates that came; the report counts the others",
                 f"{dropped} of {sent} updates lost, {uploads} averaged in; run finished, final kNN "
                 f"{100 * out.final['knn_acc']:.2f}%", held)


def check_nan_client(work: Path) -> Check:
    """One client returns NaN weights every round: it must be rejected and logged, never averaged in."""
    import torch

    from fedssl.engines.local import start_run
    from fedssl.methods.fedavg import FedAvgClient

    original = FedAvgClient.train

    def poisoned(self: FedAvgClient, payload: Any, data: Any, *, round_index: int, client_id: int) -> Any:
        result = original(self, payload, data, round_index=round_index, client_id=client_id)
        if client_id == 1:
            result.upload = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                             for k, v in result.upload.items()}
        return result

    FedAvgClient.train = poisoned  # type: ignore[method-assign]
    try:
        out = start_run(_tiny("clients=4"), work / "nan")
    finally:
        FedAvgClient.train = original  # type: ignore[method-assign]
    rejected = sum(int(m.get("rejected", 0)) for m in out.metrics)
    finite = all(bool(torch.isfinite(p).all()) for p in out_encoder_params(work / "nan"))
    held = rejected == 3 and finite and math.isfinite(out.final["knn_acc"])
    return Check("one of 4 clients replies with NaN weights in every round (3 rounds)",
                 "its update is rejected and logged each round, never averaged; the run finishes",
                 f"{rejected} updates rejected; the final encoder's weights are "
                 f"{'all finite' if finite else 'NOT finite'}; final kNN {100 * out.final['knn_acc']:.2f}%", held)


def out_encoder_params(path: Path) -> Iterator[Any]:
    import torch

    state = torch.load(path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["method"]
    for value in state["global_model"].values():
        if value.is_floating_point():
            yield value


def check_corrupt_image(work: Path) -> Check:
    from PIL import Image

    folder = work / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 30), (40 * i, 100, 50 if c == "a" else 200)).save(folder / c / f"{i}.png")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    status, err = _cli(["run", "--set", "dataset=imagefolder", "--set", f"data_dir={folder}", "--set", "clients=2",
                        "--out", str(work / "never")])
    held = status == 2 and "broken.png" in err and "\n" not in err and not (work / "never").exists()
    return Check("an image folder with one corrupt PNG", "one line naming the file and the fix; exit 2; no run "
                 "directory left", f"exit {status}: {err}", held)


def check_clients_with_one_image(work: Path) -> Check:
    from fedssl.engines.local import start_run

    out = start_run(_tiny("clients=400", "partition=dirichlet", "alpha=0.01", "rounds=1", "local_steps=1",
                          "eval.knn_k=5"), work / "sparse")
    sizes = out.histogram.sum(axis=1)
    uploads = [r for r in out.ledger.rows if r["kind"] == "upload"]
    untrained = sum(1 for r in uploads if r.get("steps", 0) == 0)
    held = int(sizes.min()) >= 1 and int(sizes.sum()) == 512 and math.isfinite(out.final["knn_acc"])
    return Check("400 clients over 512 images, Dirichlet(0.01): many clients with one image",
                 "every client gets at least one image, every image used once; clients with < 2 images train no "
                 "step and are left out of the average",
                 f"client sizes {int(sizes.min())} to {int(sizes.max())} images; {untrained} of {len(uploads)} "
                 "clients trained no step; the run finished", held)


def check_one_class_clients(work: Path) -> Check:
    from fedssl.engines.local import start_run

    out = start_run(_tiny("partition=pathological", "classes_per_client=1", "clients=10"), work / "one-class")
    classes = (out.histogram > 0).sum(axis=1)
    held = bool((classes == 1).all()) and math.isfinite(out.final["knn_acc"])
    return Check("every client holds a single class (pathological, 1 class per client)",
                 "the run trains and finishes", f"classes per client: {sorted(set(classes.tolist()))}; final kNN "
                 f"{100 * out.final['knn_acc']:.2f}%", held)


BAD_CONFIGS: tuple[tuple[str, list[str]], ...] = (
    ("unknown method", ["run", "--method", "fedfoo"]),
    ("unknown config key", ["run", "--set", "colour=red"]),
    ("0 clients", ["run", "--set", "clients=0"]),
    ("Dirichlet alpha <= 0", ["run", "--set", "alpha=0"]),
    ("more classes per client than the dataset has",
     ["run", "--set", "dataset=synthetic", "--set", "partition=pathological", "--set", "classes_per_client=11"]),
    ("more clients than images", ["run", "--set", "dataset=synthetic", "--set", "clients=600"]),
    ("missing config file", ["run", "--config", "configs/none.toml"]),
    ("missing data directory", ["run", "--set", "dataset=cifar10", "--set", "data_dir=/nonexistent/data",
                                "--set", "download=false"]),
    ("split cut that leaves the server no layer", ["run", "--method", "mocosfl", "--set", "split.cut=9"]),
    ("FedMAE on a ResNet", ["run", "--method", "fedmae", "--set", "model.arch=resnet"]),
    ("mask ratio of 1", ["run", "--method", "fedmae", "--set", "model.arch=vit", "--set", "mae.mask_ratio=1"]),
    ("stage schedule that does not sum to the rounds",
     ["run", "--method", "lw-fedssl", "--set", "model.arch=vit", "--set", "layerwise.schedule=[1,1]"]),
    ("evaluating a folder that is not a run", ["eval", "/nonexistent/run"]),
)


def check_bad_configs(work: Path) -> list[Check]:
    """Every bad-input case of the command line, each a ``fedssl`` process of its own (a few at a time)."""
    outs = [work / f"bad-{i}" for i in range(len(BAD_CONFIGS))]
    argvs = [argv + (["--out", str(out)] if argv[0] == "run" else []) for (_, argv), out in zip(BAD_CONFIGS, outs)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_cli, argvs))
    checks = []
    for (name, argv), out, (status, err) in zip(BAD_CONFIGS, outs, results):
        held = status == 2 and err.startswith("fedssl: error: ") and "\n" not in err and not out.exists()
        checks.append(Check(f"bad input: {name} (`fedssl {' '.join(argv)}`)", "one line naming the fix, exit 2, "
                            "no run directory", f"exit {status}: {err}", held))
    return checks


def run_checks(progress: Callable[[str], None] | None = None) -> list[Check]:
    """Every check, each in a fresh temporary folder."""
    scenarios: list[tuple[str, Callable[[Path], Check | list[Check]]]] = [
        ("kill and resume", check_kill_and_resume), ("comparison re-entered", check_comparison_reentered),
        ("25% dropout", lambda w: check_dropout(w, 0.25)), ("50% dropout", lambda w: check_dropout(w, 0.5)),
        ("NaN client", check_nan_client), ("corrupt image", check_corrupt_image),
        ("one-image clients", check_clients_with_one_image), ("one-class clients", check_one_class_clients),
        ("bad configs", check_bad_configs)]
    checks: list[Check] = []
    for name, scenario in scenarios:
        if progress is not None:
            progress(name)
        with tempfile.TemporaryDirectory() as tmp:
            found = scenario(Path(tmp))
        checks.extend(found if isinstance(found, list) else [found])
    return checks


def reliability_section(checks: list[Check], when: str) -> str:
    table = markdown_table(["what was tried", "what must happen", "what happened", "held"],
                           [[c.what, c.expected, c.outcome.replace("|", "\\|"), "yes" if c.held else "**NO**"]
                            for c in checks])
    held = sum(c.held for c in checks)
    return (f"## Reliability: what was tried and what held\n\nRun {when} by `fedssl bench compare` "
            f"(`fedssl.reliability`): {held} of {len(checks)} held.\n\n" + table)


def checks_to_json(checks: list[Check]) -> str:
    return json.dumps([c.__dict__ for c in checks], indent=1)


__all__ = ["BAD_CONFIGS", "Check", "reliability_section", "run_checks"]
