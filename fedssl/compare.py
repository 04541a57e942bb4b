"""Comparisons of methods: run a list of settings resumably, read each outcome back from its run directory.

A :class:`Setting` is a complete config (a preset's values + ``--set`` overrides) and the
folder its run lives in. :func:`ensure_run` makes that run exist and be finished: a
finished run is left alone, an interrupted one is resumed from its last checkpoint, a
missing one is started. So a comparison killed halfway continues where it stopped, and
every figure of a comparison table is read off the run's own files (:func:`summarize_run`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedssl.config import RunConfig, config_hash, make_config
from fedssl.errors import FedSSLError
from fedssl.report import client_cost
from fedssl.resources import REFERENCE_STEP_COST, Ledger
from fedssl.run_dir import RunDir, open_run_dir, read_jsonl

FINETUNE_FILE = "finetune.json"


@dataclass(frozen=True)
class Setting:
    """One run of a comparison: its config and where it lives (``root / key``)."""

    key: str  # folder name, unique in the comparison
    label: str  # the method as the table names it
    values: Mapping[str, Any]  # a preset's values (TOML-like dict)
    overrides: tuple[str, ...] = ()  # --set key=value on top
    group: str = ""  # what the row is compared within, e.g. "Dirichlet 0.5, 10 clients"
    finetune: bool = False  # also fine-tune the final encoder (``fedssl finetune``)

    def config(self) -> RunConfig:
        return make_config(self.values, list(self.overrides))


def _check_same_config(run: RunDir, found: RunConfig, wanted: RunConfig) -> None:
    if config_hash(found) != config_hash(wanted):
        raise FedSSLError(f"{run.path} holds a run of another config than this comparison's setting; "
                          "delete that folder or choose another output folder")


def ensure_run(setting: Setting, root: Path, observer: Any = None) -> Path:
    """The setting's finished run directory under ``root``: read back, resumed or started (see module doc)."""
    from fedssl.engines.local import finetune_run, resume_run, start_run  # the engine imports the registry

    path = root / setting.key
    wanted = setting.config()
    run = RunDir(path)
    if run.config.is_file():
        _, found = open_run_dir(path)
        _check_same_config(run, found, wanted)
        if not run.final.is_file():
            resume_run(path, observer=observer)
    else:
        start_run(wanted, path, observer=observer)
    if setting.finetune and not (path / FINETUNE_FILE).is_file():
        finetune_run(path)
    return path


def summarize_run(path: Path) -> dict[str, Any]:
    """What a comparison shows of one finished run, from its files.

    Accuracies are of the FINAL encoder; memory and FLOPs are the measured client step; ``comm``
    is the mean bytes up + down per client over the run (real payloads); ``train_seconds`` the
    sum of the rounds' wall times (so a resumed run counts only the rounds it ran).
    """
    run, cfg = open_run_dir(path)
    if not run.final.is_file():
        raise FedSSLError(f"{path} has not finished; continue it with fedssl run --resume {path}")
    final = json.loads(run.final.read_text())
    ledger = Ledger.from_jsonl(run.ledger)
    cost = client_cost(ledger)
    metrics = read_jsonl(run.metrics)
    finetune = path / FINETUNE_FILE
    reference = [r for r in ledger.rows if r["kind"] == REFERENCE_STEP_COST]
    return {
        "method": cfg.method,
        "seed": cfg.seed,
        "knn": final["final"]["knn_acc"],
        "probe": final["final"].get("probe_acc"),
        "knn_init": final["initial"]["knn_acc"],
        "probe_init": final["initial"].get("probe_acc"),
        "finetune": json.loads(finetune.read_text())["test_acc"] if finetune.is_file() else None,
        "memory": cost.peak_training_bytes if cost else None,
        "flops": cost.flops_per_image if cost else None,
        "server_flops": cost.server_flops_per_image if cost else None,
        "comm": cost.mean_total_per_client if cost else 0.0,
        "reference_memory": reference[-1]["peak_training_bytes"] if reference else None,
        "train_seconds": float(sum(m["seconds"] for m in metrics)),
        "image_steps": int(sum(m["images"] for m in metrics)),
        "rounds": cfg.rounds,
    }


def run_comparison(settings: Sequence[Setting], root: Path,
                   progress: Callable[[int, Setting], Any] | None = None) -> list[dict[str, Any]]:
    """Ensure every setting's run (in order) and return one summary row per setting (with key, label, group)."""
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise FedSSLError("two settings of the comparison share a folder name; give each a unique key")
    rows = []
    for index, setting in enumerate(settings):
        observer = progress(index, setting) if progress is not None else None
        path = ensure_run(setting, root, observer)
        rows.append({"key": setting.key, "label": setting.label, "group": setting.group, **summarize_run(path)})
    return rows


__all__ = ["FINETUNE_FILE", "Setting", "ensure_run", "run_comparison", "summarize_run"]


# ---------------------------------------------------------------- the comparison presets (fedssl bench compare)


@dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison: its row label, backbone family and its config on top of the family's."""

    label: str
    family: str  # "resnet" | "vit": which base config it trains
    overrides: tuple[str, ...]
    federated: bool = True  # False: the centralized ceiling, run once (no partition, no clients)
    split_clients: tuple[int, ...] = ()  # extra client counts only this method runs at (MocoSFL: 1,000)


@dataclass(frozen=True)
class ComparePreset:
    """A whole comparison: data, the two backbone families, methods, partitions, client counts, seeds."""

    name: str
    description: str
    data: Mapping[str, Any]  # dataset keys shared by every run
    families: Mapping[str, Mapping[str, Any]]  # family -> base config (TOML-like)
    methods: tuple[MethodSpec, ...]
    partitions: tuple[tuple[str, tuple[str, ...]], ...]  # (label, overrides)
    clients: tuple[int, ...]
    seeds: tuple[int, ...]
    finetune: bool = False


PARTITIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("IID", ("partition=iid",)),
    ("Dirichlet 0.5", ("partition=dirichlet", "alpha=0.5")),
    ("2 classes per client", ("partition=pathological", "classes_per_client=2")),
)

_MOCO_V2 = ("ssl.temperature=0.2", "ssl.augment=\"mocov2\"")
METHOD_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("centralized MoCo v2 (ceiling)", "resnet", ("method=centralized", "ssl.objective=mocov2"),
               federated=False),
    MethodSpec("FedMoCo v2", "resnet", ("method=fedmoco",)),
    MethodSpec("FedSimCLR", "resnet", ("method=fedsimclr", "ssl.augment=\"simclr\"", "ssl.temperature=0.5")),
    MethodSpec("FedBYOL", "resnet", ("method=fedbyol", "ssl.augment=\"byol\"")),
    MethodSpec("MocoSFL-1 (cut 1)", "resnet", ("method=mocosfl", "split.cut=1", "split.auto_adjust=true",
                                               "ssl.temperature=0.1"), split_clients=(1000,)),
    MethodSpec("MocoSFL-3 (cut 2)", "resnet", ("method=mocosfl", "split.cut=2", "split.auto_adjust=true",
                                               "ssl.temperature=0.1"), split_clients=(1000,)),
    MethodSpec("centralized MoCo v3 (ViT ceiling)", "vit", ("method=centralized", "ssl.objective=mocov3"),
               federated=False),
    MethodSpec("FedMoCo v3 (ViT, end-to-end)", "vit", ("method=fedmocov3",)),
    MethodSpec("LW-FedSSL", "vit", ("method=lw-fedssl",)),
    MethodSpec("LW-FedSSL full (calibration + alignment)", "vit",
               ("method=lw-fedssl", "calibration.aux_fraction=0.05", "calibration.steps=10", "alignment.weight=0.5")),
    MethodSpec("Prog-FedSSL", "vit", ("method=prog-fedssl",)),
    MethodSpec("FedMAE (stage-wise)", "vit", ("method=fedmae", "optimizer=\"adamw\"", "lr=1.5e-3",
                                              "weight_decay=0.05", "mae.decoder_width=32", "mae.decoder_heads=2",
                                              "mae.pictures=4")),
)

COMPARE_PRESETS: dict[str, ComparePreset] = {
    "cpu-small": ComparePreset(
        name="cpu-small",
        description=("the real CIFAR-10 subset (5,085 train / 1,017 test images), a narrow ResNet-10 (width 8, "
                     "GroupNorm) and a 3-block ViT (width 32, patch 4), 3 rounds of one local epoch (MocoSFL: the "
                     "same image-steps; layer-wise methods: one round per block), one seed; under an hour on 2 CPU "
                     "cores"),
        data={"dataset": "cifar10", "download": False},
        families={
            "resnet": {"model": {"arch": "resnet", "width": 8, "blocks_per_stage": [1, 1, 1, 1], "norm": "group"},
                       "rounds": 3, "local_epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.06,
                       "weight_decay": 5e-4, "ssl": {"proj_hidden": 256, "proj_dim": 128, "queue_size": 1024},
                       "eval": {"every": 0}},
            "vit": {"model": {"arch": "vit", "width": 32, "depth": 3, "heads": 2, "patch_size": 4}, "rounds": 3,
                    "local_epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5,
                    "layerwise": {"rounds_per_stage": 1},
                    "ssl": {"proj_hidden": 128, "proj_dim": 64, "temperature": 0.2},
                    "eval": {"every": 0}},
        },
        methods=METHOD_SPECS, partitions=PARTITIONS, clients=(10, 100), seeds=(0,)),
    "gpu-paper": ComparePreset(
        name="gpu-paper",
        description=("the papers' scale: full CIFAR-10 (downloaded), ResNet-18 (width 64, GroupNorm) and ViT-Tiny "
                     "(width 192, 12 blocks, patch 4), 100 rounds for the ResNet methods and 12 stages x 15 rounds "
                     "for the ViT methods, three seeds, fine-tuning too; for a GPU (`--set device=cuda`)"),
        data={"dataset": "cifar10", "download": True},
        families={
            "resnet": {"model": {"arch": "resnet", "width": 64, "blocks_per_stage": [2, 2, 2, 2], "norm": "group"},
                       "rounds": 100, "local_epochs": 1, "batch_size": 128, "optimizer": "sgd", "lr": 0.06,
                       "weight_decay": 5e-4, "ssl": {"proj_hidden": 512, "proj_dim": 128, "queue_size": 6000},
                       "eval": {"every": 10}},
            "vit": {"model": {"arch": "vit", "width": 192, "depth": 12, "heads": 3, "patch_size": 4}, "rounds": 180,
                    "local_epochs": 1, "batch_size": 256, "optimizer": "adamw", "lr": 1.5e-4, "weight_decay": 1e-5,
                    "layerwise": {"rounds_per_stage": 15},
                    "ssl": {"proj_hidden": 512, "proj_dim": 256, "temperature": 0.2},
                    "eval": {"every": 15}},
        },
        methods=METHOD_SPECS, partitions=PARTITIONS, clients=(10, 100), seeds=(0, 1, 2), finetune=True),
}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def build_grid(preset: ComparePreset, extra: Sequence[str] = ()) -> list[Setting]:
    """Every run of a preset: each method x partition x client count x seed (a ceiling once per seed)."""
    settings: list[Setting] = []
    for seed in preset.seeds:
        for spec in preset.methods:
            values = {**preset.families[spec.family], **preset.data}
            common = (*spec.overrides, f"seed={seed}", *extra)
            if not spec.federated:
                settings.append(Setting(f"{_slug(spec.label)}-s{seed}", spec.label, values, common,
                                        group="pooled data", finetune=preset.finetune))
                continue
            for part_label, part in preset.partitions:
                for clients in (*preset.clients, *spec.split_clients):
                    key = f"{_slug(spec.label)}-{_slug(part_label)}-{clients}c-s{seed}"
                    settings.append(Setting(key, spec.label, values, (*part, f"clients={clients}", *common),
                                            group=f"{part_label}, {clients:,} clients", finetune=preset.finetune))
    return settings
