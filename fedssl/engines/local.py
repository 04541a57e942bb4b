"""The in-process engine: every client simulated in one Python process, seeded and deterministic.

Per round: sample clients (seeded by round), send each the server's payload,
run its local training, collect the uploads, aggregate, evaluate (kNN monitor),
checkpoint atomically. The same seed gives the same metrics twice, and a run
resumed from its last checkpoint ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedssl.config import DEVICE_PATTERN, RunConfig
from fedssl.data.augment import EvalTransform
from fedssl.data.datasets import DatasetInfo, ImageData, load_split
from fedssl.data.partition import class_histogram, hold_out, partition
from fedssl.errors import FedSSLError
from fedssl.evaluation import PixelEncoder, evaluate, extract_features, knn_accuracy
from fedssl.methods import METHODS, build_method
from fedssl.methods.base import FederatedMethod, Method, MethodContext, SplitMethod
from fedssl.models.encoder import Encoder
from fedssl.resources import REFERENCE_STEP_COST, Ledger
from fedssl.report import finish_run
from fedssl.run_dir import (RunDir, RunOutcome, create_run_dir, ensure_new_run_dir, load_checkpoint, open_run_dir, save_checkpoint,
                             write_jsonl)
from fedssl.engines.rounds import (federated_round, local_exchange, returns_update,  # noqa: F401 (re-exported)
                                  sample_clients)


class Observer(Protocol):
    """What a user interface sees of a run (the CLI draws progress bars from it)."""

    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...
    def round_done(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentObserver:
    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...
    def round_done(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class Federation:
    """The data as the run sees it: pooled train/test splits and the clients' index sets."""

    train: ImageData  # the training split less the validation split: the clients' pool and the kNN / probe bank
    test: ImageData
    client_indices: list[np.ndarray]
    server_indices: np.ndarray | None = None  # the server's auxiliary share (Method.aux_fraction), never a client's
    val: ImageData | None = None  # eval.val_fraction of the training split, held out before partitioning

    @property
    def monitor(self) -> ImageData:
        """What the kNN monitor scores: the validation split where there is one, else the test split."""
        return self.test if self.val is None else self.val

    def client_data(self, client_id: int) -> ImageData:
        return self.train.subset(self.client_indices[client_id])

    def server_data(self) -> ImageData | None:
        return None if self.server_indices is None else self.train.subset(self.server_indices)

    def histogram(self) -> np.ndarray:  # (clients, classes)
        return class_histogram(self.train.labels.numpy(), self.client_indices, self.train.info.num_classes)


def load_federation(cfg: RunConfig, pooled: bool) -> Federation:
    """Load both splits and partition the training split over the clients (one part if pooled)."""
    kwargs = dict(data_dir=cfg.data_dir or None, image_size=cfg.image_size or None, download=cfg.download,
                  seed=cfg.seed)
    train = load_split(cfg.dataset, "train", **kwargs)
    test = load_split(cfg.dataset, "test", **kwargs)
    val = None
    if cfg.eval.val_fraction > 0:
        val_ix, rest = hold_out(len(train), cfg.eval.val_fraction, cfg.seed, salt=0x7A1)
        train, val = train.subset(rest), train.subset(val_ix)
    server, pool = None, np.arange(len(train), dtype=np.int64)
    fraction = METHODS[cfg.method].aux_fraction(cfg)
    if fraction > 0 and not pooled:
        server, pool = hold_out(len(train), fraction, cfg.seed)  # removed BEFORE partitioning
    if pooled:
        parts = [pool]
    else:
        parts = [pool[p] for p in partition(train.labels.numpy()[pool], cfg.clients, cfg.partition, alpha=cfg.alpha,
                                            classes_per_client=cfg.classes_per_client,
                                            shards_per_client=cfg.shards_per_client, seed=cfg.seed)]
    return Federation(train, test, parts, server, val)


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device``: ``cpu``, ``cuda`` (= the current CUDA device) or ``cuda:N``.

    A device this machine does not have is one clear error naming the fix, before anything is built on it.
    """
    match = DEVICE_PATTERN.fullmatch(name)
    if match is None:
        raise FedSSLError(f"device {name!r} is not cpu, cuda or cuda:N; use e.g. --set device=cuda")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FedSSLError(f"device {name} was asked for but CUDA is not available here "
                          f"(torch {torch.__version__}); use --set device=cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise FedSSLError(f"device {name} was asked for but this machine has {count} CUDA device(s); "
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def eval_transform(fed: Federation, device: torch.device) -> EvalTransform:
    """uint8 images -> normalised float at the training resolution."""
    return EvalTransform(fed.train.images.shape[-1], fed.train.info.mean, fed.train.info.std).to(device)


def knn_monitor(method: Method, fed: Federation, cfg: RunConfig, device: torch.device) -> float:
    """kNN accuracy of the current encoder on ``fed.monitor`` (monitoring only: nothing is selected on it)."""
    transform = eval_transform(fed, device)
    encoder = method.encoder()
    train_f = extract_features(encoder, fed.train.images, transform=transform, batch_size=cfg.eval.batch_size,
                               device=device)
    query_f = extract_features(encoder, fed.monitor.images, transform=transform, batch_size=cfg.eval.batch_size,
                               device=device)
    return knn_accuracy(train_f, fed.train.labels, query_f, fed.monitor.labels, k=cfg.eval.knn_k,
                        temperature=cfg.eval.knn_t, num_classes=fed.train.info.num_classes)


def evaluate_encoder(encoder: torch.nn.Module, fed: Federation, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """kNN + linear probe of a frozen encoder: bank and probe on the train split, scored on test (and val)."""
    val = None if fed.val is None else (fed.val.images, fed.val.labels)
    result = evaluate(encoder, fed.train.images, fed.train.labels, fed.test.images, fed.test.labels,
                      transform=eval_transform(fed, device), knn_k=cfg.eval.knn_k, knn_t=cfg.eval.knn_t, probe=cfg.eval.probe,
                      probe_epochs=cfg.eval.probe_epochs, device=device, batch_size=cfg.eval.batch_size,
                      seed=cfg.seed, val=val)
    return result.as_dict()


def full_evaluation(method: Method, fed: Federation, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """kNN + linear probe of the encoder as it is now (called on the FINAL encoder)."""
    return evaluate_encoder(method.encoder(), fed, cfg, device)


def baseline_evaluation(method: Method, fed: Federation, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """What every result stands beside: the random-init encoder of the FINAL architecture, and raw pixels.

    Called before the first round. ``pixels``: the same kNN + probe on the normalised pixels (``PixelEncoder``).
    """
    initial = evaluate_encoder(method.initial_encoder(), fed, cfg, device)
    return {**initial, "pixels": evaluate_encoder(PixelEncoder().to(device), fed, cfg, device)}


def run_round(method: Method, fed: Federation, cfg: RunConfig, round_index: int, ledger: Ledger,
              observer: Observer) -> dict[str, Any]:
    """One round in this process: download, local training, upload, aggregation; returns its metrics row."""
    if isinstance(method, SplitMethod):
        observer.round_started(round_index, 1)
        row = method.train_round(round_index, fed.client_data, len(fed.client_indices), ledger)
        observer.client_done(round_index, -1, row)
        return {"round": round_index + 1, **row}
    assert isinstance(method, FederatedMethod)
    return federated_round(method, cfg, round_index, len(fed.client_indices), local_exchange(method, fed.client_data),
                           ledger, observer)


class RoundRunner(Protocol):
    """How an engine runs the rounds of ``_execute``: in this process, or over Flower's Grid."""

    def begin(self, method: Method) -> None:
        """Before the first round this engine runs (a new run, or a resumed one)."""

    def run_round(self, method: Method, round_index: int, ledger: Ledger, observer: Observer) -> dict[str, Any]:
        """One round on the clients; its metrics row."""


@dataclass
class LocalRunner:
    """The in-process engine's rounds (:func:`run_round`)."""

    fed: Federation
    cfg: RunConfig

    def begin(self, method: Method) -> None: ...

    def run_round(self, method: Method, round_index: int, ledger: Ledger, observer: Observer) -> dict[str, Any]:
        return run_round(method, self.fed, self.cfg, round_index, ledger, observer)


def start_run(cfg: RunConfig, path: str | Path, *, observer: Observer | None = None) -> RunOutcome:
    """A new run in a new directory (created only once the data has loaded)."""
    ensure_new_run_dir(path)
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    return _execute(cfg, create_run_dir(path, cfg), fed, device, observer or SilentObserver())


def resume_run(path: str | Path, *, observer: Observer | None = None) -> RunOutcome:
    """Continue a run from its last checkpoint (or from the start if it never finished a round)."""
    run, cfg = open_run_dir(path)
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    return _execute(cfg, run, fed, device, observer or SilentObserver())


def _execute(cfg: RunConfig, run: RunDir, fed: Federation, device: torch.device, observer: Observer,
             runner: RoundRunner | None = None) -> RunOutcome:
    """Run the experiment from its last checkpoint to the end and evaluate the final encoder.

    ``runner`` runs the rounds (default: in this process); everything else (evaluation, checkpoints,
    the run directory, the report) is the same for every engine.
    """
    with torch_threads(cfg.threads):
        return _execute_rounds(cfg, run, fed, device, observer, runner or LocalRunner(fed, cfg))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (0 = leave it) for the enclosed code, then restored, so
    that a run started in-process (tests, comparisons, reliability checks) leaves its caller's setting alone."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _execute_rounds(cfg: RunConfig, run: RunDir, fed: Federation, device: torch.device, observer: Observer,
                    runner: RoundRunner) -> RunOutcome:
    method = build_method(MethodContext(cfg, fed.train.info, device, server_data=fed.server_data()))
    checkpoint = load_checkpoint(run, cfg)
    if checkpoint is None:
        first_round, metrics, ledger = 0, [], Ledger(rows=[])
        observer.message("evaluating the random-init encoder and raw pixels (kNN + linear probe) ...")
        initial = baseline_evaluation(method, fed, cfg, device)
        measure_client_costs(method, fed, ledger)
    else:
        method.load_state_dict(checkpoint["method"])
        first_round, metrics, initial = checkpoint["round"], checkpoint["metrics"], checkpoint["initial"]
        ledger = Ledger(rows=[])
        ledger.load_state_dict(checkpoint["ledger"])
        observer.message(f"resuming {run.path} after round {first_round}/{cfg.rounds}")
    runner.begin(method)
    for r in range(first_round, cfg.rounds):
        row = runner.run_round(method, r, ledger, observer)
        method.write_round_figures(r, run.figures, fed.test)
        last = r + 1 == cfg.rounds
        if (cfg.eval.every and (r + 1) % cfg.eval.every == 0) or last:
            row["knn_acc"] = knn_monitor(method, fed, cfg, device)
        metrics.append(row)
        observer.round_done(row)
        if (r + 1) % cfg.checkpoint_every == 0 or last:
            save_checkpoint(run, cfg, {"round": r + 1, "method": method.state_dict(), "metrics": metrics,
                                       "initial": initial, "ledger": ledger.state_dict()})
            write_jsonl(run.metrics, metrics)
            ledger.to_jsonl(run.ledger)
    observer.message("evaluating the final encoder (kNN + linear probe) ...")
    final = full_evaluation(method, fed, cfg, device)
    outcome = RunOutcome(run, metrics, initial, final, ledger, fed.histogram())
    finish_run(outcome, cfg)
    return outcome


def measure_client_costs(method: Method, fed: Federation, ledger: Ledger) -> None:
    """One real measured step of the largest client, and of the method's reference if it has one."""
    client = _largest_client(fed)
    data = fed.client_data(client)
    ledger.record_step_cost(round=0, client=client, cost=method.measure_client_step(data))
    reference = method.reference_cost(data)
    if reference is not None:
        ledger.record(round=0, client=client, kind=REFERENCE_STEP_COST, payload_bytes=reference.payload_bytes,
                      **reference.cost.as_dict())


def _largest_client(fed: Federation) -> int:
    return int(np.argmax([len(ix) for ix in fed.client_indices]))


def _restore(path: str | Path) -> tuple[RunConfig, RunDir, Method, Federation, torch.device]:
    """A run's config, its method with the last checkpoint's weights, and its (pooled) data."""
    run, cfg = open_run_dir(path)
    checkpoint = load_checkpoint(run, cfg)
    if checkpoint is None:
        raise FedSSLError(f"{run.path} has no checkpoint yet; run it first (fedssl run --resume {run.path})")
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=True)
    method = build_method(MethodContext(cfg, fed.train.info, device))
    method.load_state_dict(checkpoint["method"])
    if checkpoint["round"] < cfg.rounds:
        raise FedSSLError(f"{run.path} stopped after round {checkpoint['round']} of {cfg.rounds}; "
                          f"finish it with fedssl run --resume {run.path} before evaluating the final encoder")
    return cfg, run, method, fed, device


def evaluate_run(path: str | Path, *, probe: bool = True) -> dict[str, Any]:
    """kNN (+ linear probe) of a finished run's FINAL encoder, beside the random-init encoder of the same
    architecture (``random_init``, rebuilt from the run's seed) and raw pixels (``pixels``), same protocol;
    written to RUN_DIR/eval.json."""
    import json
    from dataclasses import replace

    from fedssl.io import atomic_write_text

    cfg, run, method, fed, device = _restore(path)
    cfg = replace(cfg, eval=replace(cfg.eval, probe=probe))
    with torch_threads(cfg.threads):  # the run's thread count, as while it trained
        result = full_evaluation(method, fed, cfg, device)
        untrained = build_method(MethodContext(cfg, fed.train.info, device))
        result.update(baseline_split(baseline_evaluation(untrained, fed, cfg, device)))
    atomic_write_text(run.path / "eval.json", json.dumps(result, indent=2, sort_keys=True))
    return result


def evaluate_baselines(cfg: RunConfig) -> dict[str, Any]:
    """Without training: the random-init encoder of the config's FINAL architecture and raw pixels, scored as every
    run scores its encoder (``baseline_evaluation``)."""
    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads):
        fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
        method = build_method(MethodContext(cfg, fed.train.info, device, server_data=fed.server_data()))
        return baseline_split(baseline_evaluation(method, fed, cfg, device))


def baseline_split(initial: dict[str, Any]) -> dict[str, Any]:
    """``baseline_evaluation``'s dict as ``{"random_init": {...}, "pixels": {...}}``."""
    return {"random_init": {k: v for k, v in initial.items() if k != "pixels"}, "pixels": initial["pixels"]}


def finetune_run(path: str | Path, *, epochs: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """Fine-tune a finished run's FINAL encoder with a linear head (``eval.finetune_*``, or the arguments);
    scored once on the test split; written to RUN_DIR/finetune.json."""
    import json
    from dataclasses import replace

    from fedssl.config import validate
    from fedssl.data.augment import MaskedViewAugment
    from fedssl.evaluation import fine_tune
    from fedssl.io import atomic_write_text

    cfg, run, method, fed, device = _restore(path)
    ev = replace(cfg.eval, finetune_epochs=epochs or cfg.eval.finetune_epochs, finetune_lr=lr or cfg.eval.finetune_lr)
    cfg = validate(replace(cfg, eval=ev))
    info = fed.train.info
    crop_flip = MaskedViewAugment(int(fed.train.images.shape[-1]), info.mean, info.std, channels=info.channels).to(device)
    with torch_threads(cfg.threads):  # the run's thread count, as while it trained
        result = fine_tune(method.encoder(), fed.train.images, fed.train.labels, fed.test.images, fed.test.labels,
                           augment=lambda images: crop_flip(images)[0], transform=eval_transform(fed, device),
                           epochs=ev.finetune_epochs, lr=ev.finetune_lr, weight_decay=ev.finetune_weight_decay,
                           batch_size=ev.finetune_batch_size, device=device, seed=cfg.seed,
                           num_classes=info.num_classes)
    result = {**result, "epochs": ev.finetune_epochs, "lr": ev.finetune_lr}
    atomic_write_text(run.path / "finetune.json", json.dumps(result, indent=2, sort_keys=True))
    return result


def restore_final_encoder(path: str | Path) -> tuple[Encoder, DatasetInfo, int]:
    """A finished run's final encoder (``method.encoder()``), its data's info (channels, mean, std) and image side."""
    _, _, method, fed, _ = _restore(path)
    return method.encoder(), fed.train.info, int(fed.train.images.shape[-1])


def export_run(path: str | Path, out: str | Path) -> tuple[int, ...]:
    """Write a finished run's final encoder to ``out`` (format by suffix, see ``fedssl.export``);
    returns the input shape (C, H, W) it expects."""
    from fedssl.export import export_encoder

    encoder, info, size = restore_final_encoder(path)
    export_encoder(encoder, mean=info.mean, std=info.std, channels=info.channels, image_size=size, path=out)
    return (info.channels, size, size)
