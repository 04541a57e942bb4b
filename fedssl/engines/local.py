"""The in-process engine: every client simulated in one Python process, seeded and deterministic.

Per round: sample clients (seeded by round), send each the server's payload,
run its local training, collect the uploads, aggregate, evaluate (kNN monitor),
checkpoint atomically. The same seed gives the same metrics twice, and a run
resumed from its last checkpoint ends exactly like an uninterrupted one.
The run loop is ``fedssl.engines.loop`` (shared with the Flower engine); a round is
``fedssl.engines.rounds.federated_round`` or ``fedssl.engines.steps.split_round``
over this process's exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedssl.config import RunConfig
from fedssl.data.augment import EvalTransform
from fedssl.data.datasets import DatasetInfo
from fedssl.errors import FedSSLError
from fedssl.evaluation import PixelEncoder, evaluate, extract_features, knn_accuracy
from fedssl.methods import METHODS, build_method
from fedssl.methods.base import FederatedMethod, Method, MethodContext
from fedssl.methods.split import SplitMethod
from fedssl.models.encoder import Encoder
from fedssl.resources import Ledger
from fedssl.devices.fleet import BudgetError
from fedssl.run_dir import (RunDir, RunOutcome, create_run_dir, discard_unstarted, ensure_new_run_dir, load_checkpoint,
                            open_run_dir)
from fedssl.engines.federation import Federation, load_federation, resolve_device  # noqa: F401 (re-exported)
from fedssl.engines.loop import Scoring, execute, torch_threads  # noqa: F401 (re-exported)
from fedssl.engines.observer import Observer, SilentObserver  # noqa: F401 (re-exported)
from fedssl.engines.rounds import (federated_round, local_exchange, returns_update,  # noqa: F401 (re-exported)
                                  sample_clients)
from fedssl.engines.steps import LocalSplitExchange, split_round


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
    """One round in this process over the clients simulated here; returns its metrics row."""
    num_clients = len(fed.client_indices)
    if isinstance(method, SplitMethod):
        if num_clients != method.num_clients:
            raise FedSSLError(f"the run has {num_clients} clients but {method.name} was built for {method.num_clients}")
        return split_round(method, cfg, round_index, LocalSplitExchange(method.clients, fed.client_data), ledger,
                           observer)
    assert isinstance(method, FederatedMethod)
    return federated_round(method, cfg, round_index, num_clients, local_exchange(method, fed.client_data), ledger,
                           observer)


@dataclass
class LocalRunner:
    """The in-process engine's rounds (:func:`run_round`)."""

    fed: Federation
    cfg: RunConfig

    def begin(self, method: Method, resumed: bool) -> None: ...

    def run_round(self, method: Method, round_index: int, ledger: Ledger, observer: Observer) -> dict[str, Any]:
        return run_round(method, self.fed, self.cfg, round_index, ledger, observer)


SCORING = Scoring(baseline=baseline_evaluation, monitor=knn_monitor, final=full_evaluation)


def check_local_config(cfg: RunConfig) -> None:
    """A config only the Flower engine can run, refused with the fix."""
    if cfg.flower.secagg:
        raise FedSSLError("flower.secagg runs Flower's SecAgg+ protocol over messages, which the in-process engine "
                          "does not send; run it with --engine flower (or on a deployment) or set flower.secagg=false")


def start_run(cfg: RunConfig, path: str | Path, *, observer: Observer | None = None) -> RunOutcome:
    """A new run in a new directory (created only once the data has loaded)."""
    check_local_config(cfg)
    ensure_new_run_dir(path)
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    run = create_run_dir(path, cfg)
    try:
        return _execute(cfg, run, fed, device, observer or SilentObserver())
    except BudgetError:
        discard_unstarted(run)  # refused before training: no run directory is left behind
        raise


def resume_run(path: str | Path, *, observer: Observer | None = None) -> RunOutcome:
    """Continue a run from its last checkpoint (or from the start if it never finished a round)."""
    run, cfg = open_run_dir(path)
    check_local_config(cfg)
    device = resolve_device(cfg.device)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    return _execute(cfg, run, fed, device, observer or SilentObserver())


def _execute(cfg: RunConfig, run: RunDir, fed: Federation, device: torch.device, observer: Observer) -> RunOutcome:
    """The shared run loop (``fedssl.engines.loop.execute``) with this process's rounds and scoring."""
    return execute(cfg, run, fed, device, observer, LocalRunner(fed, cfg), SCORING)


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
