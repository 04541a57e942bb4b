"""Comparisons of methods: run a list of settings resumably, read each outcome back from its run directory.

A :class:`Setting` is a complete config (a preset's values + ``--set`` overrides) and the
folder its run lives in. :func:`ensure_run` makes that run exist and be finished: a
finished run is left alone, an interrupted one is resumed from its last checkpoint, a
missing one is started. So a comparison killed halfway continues where it stopped, and
every figure of a comparison table is read off the run's own files (:func:`summarize_run`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

from fedssl.config import RunConfig, config_hash, make_config
from fedssl.errors import FedSSLError
from fedssl.fleet_page import fleet_summary_of
from fedssl.report import client_cost
from fedssl.resources import REFERENCE_STEP_COST, Ledger
from fedssl.run_dir import RunDir, open_run_dir, read_jsonl
from fedssl.run_pool import check_jobs, run_in_processes

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
    initial, trained = final["initial"], final["final"]
    pixels = initial.get("pixels", {})
    return {
        "method": cfg.method,
        "arch": cfg.model.arch,
        "seed": cfg.seed,
        "knn": trained["knn_acc"],
        "probe": trained.get("probe_acc"),
        "knn_init": initial["knn_acc"],
        "probe_init": initial.get("probe_acc"),
        "knn_pixels": pixels.get("knn_acc"),
        "probe_pixels": pixels.get("probe_acc"),
        "val_knn": trained.get("val_knn_acc"),
        "val_knn_init": initial.get("val_knn_acc"),
        "val_knn_pixels": pixels.get("val_knn_acc"),
        "optimizer_steps": ledger.optimizer_steps(),
        "code_version": final.get("code_version", "unrecorded"),
        "finetune": json.loads(finetune.read_text())["test_acc"] if finetune.is_file() else None,
        "memory": cost.peak_training_bytes if cost else None,
        "flops": cost.flops_per_image if cost else None,
        "server_flops": cost.server_flops_per_image if cost else None,
        "comm": cost.mean_total_per_client if cost else 0.0,
        "reference_memory": reference[-1]["peak_training_bytes"] if reference else None,
        "train_seconds": float(sum(m["seconds"] for m in metrics)),
        "image_steps": int(sum(m["images"] for m in metrics)),
        "rounds": cfg.rounds,
        **({"fleet": fleet_summary_of(cfg, final, metrics)} if cfg.devices.mix else {}),
    }


def finished_settings(settings: Sequence[Setting], root: Path) -> list[Setting]:
    """The settings whose run directory under ``root`` holds a finished run (its final.json), in grid order."""
    return [s for s in settings if RunDir(root / s.key).final.is_file()]


def run_comparison(settings: Sequence[Setting], root: Path,
                   progress: Callable[[int, Setting], Any] | None = None, *, jobs: int = 1,
                   finished: Callable[[int, Setting, float], None] | None = None) -> list[dict[str, Any]]:
    """Ensure every setting's run and return one summary row per setting (with key, label, group), in grid order.

    ``jobs`` > 1 runs that many settings at once, each in its own process (:func:`run_in_processes`); each run
    is the same resumable run directory as with ``jobs`` = 1, so the rows are the same whichever ran them.
    ``progress(index, setting)`` is called as a setting starts (with ``jobs`` = 1 it may return the run's
    observer), ``finished(index, setting, seconds)`` as it ends.
    """
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise FedSSLError("two settings of the comparison share a folder name; give each a unique key")
    check_jobs(jobs)
    if jobs == 1:
        for index, setting in enumerate(settings):
            observer = progress(index, setting) if progress is not None else None
            started = time.perf_counter()
            ensure_run(setting, root, observer)
            if finished is not None:
                finished(index, setting, time.perf_counter() - started)
    else:
        run_in_processes(ensure_run, settings, root, jobs, progress=progress, finished=finished)
    return [{"key": s.key, "label": s.label, "group": s.group, **summarize_run(root / s.key)} for s in settings]


__all__ = ["FINETUNE_FILE", "Setting", "ensure_run", "finished_settings", "run_comparison", "select_settings",
           "summarize_run"]


# ---------------------------------------------------------------- the comparison presets (fedssl bench compare)


@dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison: its row label, backbone family and its config on top of the family's."""

    label: str
    family: str  # "resnet" | "vit": which base config it trains
    overrides: tuple[str, ...]
    federated: bool = True  # False: the centralized ceiling, run once per seed (no partition, no clients)


@dataclass(frozen=True)
class Block:
    """One setting of a comparison: a partition over some clients, which methods run there, with which seeds."""

    partition: str  # its label, e.g. "Dirichlet 0.5"
    overrides: tuple[str, ...]  # e.g. ("partition=dirichlet", "alpha=0.5")
    clients: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = ()  # labels of the federated methods run here (() = every federated method)

    @property
    def group(self) -> str:
        return f"{self.partition}, {self.clients:,} clients"


@dataclass(frozen=True)
class FleetSpec:
    """A fleet a comparison runs every federated method on (seed 0 of ``block``), clocked on its profiles.

    ``overrides``: its ``[devices]`` keys; every fleet run also monitors kNN on a validation split each round
    (:data:`FLEET_EVAL`) so that its time to random init + 5 points is read on data no choice is made on.
    """

    name: str  # e.g. "100 Raspberry Pi 4 on 10/2 Mbit/s"
    description: str
    overrides: tuple[str, ...]  # e.g. ("devices.mix={rpi4=1.0}",)
    block: Block  # the partition, clients and seeds it runs on

    @property
    def slug(self) -> str:
        return _slug(self.name)

    @property
    def group(self) -> str:
        return f"fleet: {self.name}"


FLEET_EVAL = ("eval.every=1", "eval.val_fraction=0.2", "eval.probe=false")


@dataclass(frozen=True)
class ComparePreset:
    """A whole comparison: data, the two backbone families, methods, the settings (blocks) and the ceilings' seeds."""

    name: str
    description: str
    data: Mapping[str, Any]  # dataset keys shared by every run
    families: Mapping[str, Mapping[str, Any]]  # family -> base config (TOML-like)
    methods: tuple[MethodSpec, ...]
    blocks: tuple[Block, ...]
    ceiling_seeds: tuple[int, ...]
    headline: str  # the group the plots and the claims' table read (a Block.group)
    finetune: bool = False
    method_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # label -> preset-specific keys
    fleets: tuple[FleetSpec, ...] = ()  # the page's fleet section (every federated method on each)

    @property
    def fleets_only(self) -> bool:
        """A preset of fleet runs alone (no ceilings, no blocks): its page is docs/FLEETS.md."""
        return not self.blocks and not self.ceiling_seeds


IID = ("IID", ("partition=iid",))
DIRICHLET = ("Dirichlet 0.5", ("partition=dirichlet", "alpha=0.5"))
TWO_CLASSES = ("2 classes per client", ("partition=pathological", "classes_per_client=2"))

METHOD_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("centralized MoCo v2 (ceiling)", "resnet", ("method=centralized", "ssl.objective=mocov2"),
               federated=False),
    MethodSpec("FedMoCo v2", "resnet", ("method=fedmoco",)),
    MethodSpec("FedSimCLR", "resnet", ("method=fedsimclr", "ssl.augment=\"simclr\"", "ssl.temperature=0.5")),
    MethodSpec("FedBYOL", "resnet", ("method=fedbyol", "ssl.augment=\"byol\"")),
    MethodSpec("MocoSFL-1 (cut 1)", "resnet", ("method=mocosfl", "split.cut=1", "split.auto_adjust=true",
                                               "ssl.temperature=0.1")),
    MethodSpec("MocoSFL-3 (cut 2)", "resnet", ("method=mocosfl", "split.cut=2", "split.auto_adjust=true",
                                               "ssl.temperature=0.1")),
    MethodSpec("centralized MoCo v3 (ViT ceiling)", "vit", ("method=centralized", "ssl.objective=mocov3"),
               federated=False),
    MethodSpec("FedMoCo v3 (ViT, end-to-end)", "vit", ("method=fedmocov3",)),
    MethodSpec("LW-FedSSL", "vit", ("method=lw-fedssl",)),
    MethodSpec("LW-FedSSL full (calibration + alignment)", "vit",
               ("method=lw-fedssl", "calibration.aux_fraction=0.05", "calibration.steps=10", "alignment.weight=0.5")),
    MethodSpec("Prog-FedSSL", "vit", ("method=prog-fedssl",)),
    MethodSpec("FedMAE (stage-wise)", "vit", ("method=fedmae", "mae.pictures=4")),
    MethodSpec("federated MAE (end-to-end)", "vit", ("method=fedmae", "mae.cascade=\"end-to-end\"", "mae.pictures=4")),
)
ALL_FEDERATED = tuple(m.label for m in METHOD_SPECS if m.federated)


def _paper_blocks(seeds: tuple[int, ...]) -> tuple[Block, ...]:
    """Every partition x 10 and 100 clients for every method, MocoSFL also at 1,000 clients."""
    mocosfl = tuple(m for m in ALL_FEDERATED if m.startswith("MocoSFL"))
    return tuple(Block(label, part, clients, seeds) for label, part in (IID, DIRICHLET, TWO_CLASSES)
                 for clients in (10, 100)) + tuple(Block(label, part, 1000, seeds, mocosfl)
                                                   for label, part in (IID, DIRICHLET, TWO_CLASSES))


_CPU_RESNET = {"model": {"arch": "resnet", "width": 16, "blocks_per_stage": [1, 1, 1, 1], "norm": "group",
                         "group_channels": 8},
               "rounds": 8, "local_epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.06,
               "weight_decay": 5e-4, "ssl": {"proj_hidden": 256, "proj_dim": 128, "queue_size": 1024, "blur": False},
               "eval": {"every": 0}}
_CPU_VIT = {"model": {"arch": "vit", "width": 64, "depth": 4, "heads": 4, "patch_size": 4}, "rounds": 8,
            "local_epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
            "layerwise": {"rounds_per_stage": 2},
            "ssl": {"proj_hidden": 256, "proj_dim": 128, "temperature": 0.2, "blur": False},
            "mae": {"decoder_width": 64, "decoder_heads": 2},
            "eval": {"every": 0}}

_FLEET_BLOCK = Block(*DIRICHLET, 100, (0,))
_CPU_FLEETS = (
    FleetSpec("100 Raspberry Pi 4 on 10/2 Mbit/s",
              "Every client a Raspberry Pi 4 (the built-in `rpi4` profile: 8 GFLOP/s, 10 Mbit/s down, 2 Mbit/s up, "
              "50 ms RTT, 6 W), always reachable, no deadline; Dirichlet 0.5 over 100 clients; MocoSFL's server on "
              "the `server-gpu` profile.",
              ("devices.mix={rpi4=1.0}",), _FLEET_BLOCK),
    FleetSpec("50 phones + 50 Raspberry Pi 4, 30 s deadline",
              "Half the clients mid-range phones (`phone`: 20 GFLOP/s, 50/10 Mbit/s, reachable 80% of rounds, 4 W), "
              "half Raspberry Pi 4; a round waits at most 30 simulated seconds: a client whose download + training "
              "+ upload (MocoSFL: its steps and its sync) would take longer is late and not aggregated; Dirichlet "
              "0.5 over 100 clients.",
              ("devices.mix={rpi4=0.5,phone=0.5}", "devices.round_deadline_s=30"), _FLEET_BLOCK),
)

_CPU_DATA = {"dataset": "cifar10", "download": False}
_CPU_METHODS = tuple(m for m in METHOD_SPECS if m.label != "LW-FedSSL full (calibration + alignment)")
_CPU_NETS = ("the real CIFAR-10 subset (5,085 train / 1,017 test images), a ResNet-10 (width 16, GroupNorm of 8 "
             "channels per group: the MocoSFL client's net) and a 4-block ViT (width 64, patch 4), 8 passes over the "
             "data for every method (8 rounds of one local epoch; layer-wise methods: 2 rounds per block; MocoSFL: 8 "
             "sync periods of about an epoch each)")

COMPARE_PRESETS: dict[str, ComparePreset] = {
    "cpu": ComparePreset(
        name="cpu",
        description=(f"{_CPU_NETS}; Dirichlet 0.5 over 10 clients with three seeds, 2 classes per client over 100 "
                     "clients, IID over 100 clients for FedMoCo and MocoSFL, MocoSFL over 1,000 clients: 49 runs "
                     "(the same methods on fleets of simulated devices: `--preset cpu-fleets`, docs/FLEETS.md)"),
        data=_CPU_DATA,
        families={"resnet": _CPU_RESNET, "vit": _CPU_VIT},
        methods=_CPU_METHODS,
        blocks=(Block(*DIRICHLET, 10, (0, 1, 2)),
                Block(*TWO_CLASSES, 100, (0,)),
                Block(*IID, 100, (0,), ("FedMoCo v2", "MocoSFL-1 (cut 1)")),
                Block(*TWO_CLASSES, 1000, (0,), ("MocoSFL-1 (cut 1)",))),
        ceiling_seeds=(0, 1, 2), headline="Dirichlet 0.5, 10 clients"),
    "cpu-fleets": ComparePreset(
        name="cpu-fleets",
        description=(f"{_CPU_NETS}; every federated method of the `cpu` preset once on each of two fleets of "
                     "simulated devices (Dirichlet 0.5 over 100 clients, seed 0): 20 runs"),
        data=_CPU_DATA,
        families={"resnet": _CPU_RESNET, "vit": _CPU_VIT},
        methods=_CPU_METHODS, blocks=(), ceiling_seeds=(), headline="", fleets=_CPU_FLEETS),
    "gpu-paper": ComparePreset(
        name="gpu-paper",
        description=("the papers' scale: full CIFAR-10 (downloaded), ResNet-18 (width 64, GroupNorm) and ViT-Tiny "
                     "(width 192, 12 blocks, patch 4), 100 rounds for the ResNet methods and 12 stages x 15 rounds "
                     "for the ViT methods, three seeds, fine-tuning too; for a GPU (`--set device=cuda`)"),
        data={"dataset": "cifar10", "download": True},
        families={
            "resnet": {"model": {"arch": "resnet", "width": 64, "blocks_per_stage": [2, 2, 2, 2], "norm": "group",
                                 "group_channels": 8},
                       "rounds": 100, "local_epochs": 1, "batch_size": 128, "optimizer": "sgd", "lr": 0.06,
                       "weight_decay": 5e-4, "ssl": {"proj_hidden": 512, "proj_dim": 128, "queue_size": 6000},
                       "eval": {"every": 10}},
            "vit": {"model": {"arch": "vit", "width": 192, "depth": 12, "heads": 3, "patch_size": 4}, "rounds": 180,
                    "local_epochs": 1, "batch_size": 256, "optimizer": "adamw", "lr": 1.5e-4, "weight_decay": 1e-5,
                    "layerwise": {"rounds_per_stage": 15},
                    "ssl": {"proj_hidden": 512, "proj_dim": 256, "temperature": 0.2},
                    "eval": {"every": 15}},
        },
        methods=METHOD_SPECS, blocks=_paper_blocks((0, 1, 2)), ceiling_seeds=(0, 1, 2),
        headline="Dirichlet 0.5, 10 clients", finetune=True,
        method_overrides={"FedMAE (stage-wise)": ("lr=1.5e-3", "mae.decoder_width=128"),
                          "federated MAE (end-to-end)": ("lr=1.5e-3", "mae.decoder_width=128")}),
}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def build_grid(preset: ComparePreset, extra: Sequence[str] = ()) -> list[Setting]:
    """Every run of a preset: the ceilings once per ceiling seed, then each block's methods x its seeds."""
    settings: list[Setting] = []
    specs = {m.label: m for m in preset.methods}

    def overrides(spec: MethodSpec, seed: int) -> tuple[str, ...]:
        return (*spec.overrides, *preset.method_overrides.get(spec.label, ()), f"seed={seed}", *extra)

    def values(spec: MethodSpec) -> dict[str, Any]:
        return {**preset.families[spec.family], **preset.data}

    for spec in (m for m in preset.methods if not m.federated):
        for seed in preset.ceiling_seeds:
            settings.append(Setting(f"{_slug(spec.label)}-s{seed}", spec.label, values(spec), overrides(spec, seed),
                                    group="pooled data", finetune=preset.finetune))
    def block_settings(block: Block, key: str, group: str, more: tuple[str, ...], finetune: bool) -> None:
        """The block's methods x its seeds; ``key``: the folder name after the method's slug, before the seed."""
        for label in block.methods or tuple(m.label for m in preset.methods if m.federated):
            spec = specs[label]
            for seed in block.seeds:
                settings.append(Setting(f"{_slug(label)}-{key}-s{seed}", label, values(spec),
                                        (*block.overrides, f"clients={block.clients}", *more, *overrides(spec, seed)),
                                        group=group, finetune=finetune))

    for block in preset.blocks:
        block_settings(block, f"{_slug(block.partition)}-{block.clients}c", block.group, (), preset.finetune)
    for fleet in preset.fleets:
        block_settings(fleet.block, f"fleet-{fleet.slug}", fleet.group, (*fleet.overrides, *FLEET_EVAL), False)
    return settings


def select_settings(settings: Sequence[Setting], patterns: Sequence[str]) -> list[Setting]:
    """The settings whose key (folder name) matches one of the shell-style ``patterns``, in grid order.

    ``()`` keeps every setting. A slice of a preset (``fedssl bench compare --only 'centralized-*-s0'``) runs the
    very configs of the full grid, so its run directories are the full comparison's own (it continues them).
    """
    if not patterns:
        return list(settings)
    for pattern in patterns:
        if not any(fnmatchcase(s.key, pattern) for s in settings):
            examples = ", ".join(s.key for s in settings[:2])
            raise FedSSLError(f"--only {pattern!r} matches no setting of this comparison; keys look like "
                              f"{examples} (write e.g. --only 'fedmoco-v2-*-s0')")
    return [s for s in settings if any(fnmatchcase(s.key, p) for p in patterns)]
