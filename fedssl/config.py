"""The run configuration: built from defaults, a TOML preset and overrides, then validated.

A config is built from (in order) the dataclass defaults (``fedssl.config_schema``), an optional TOML
preset, and ``--set key=value`` overrides with dotted keys (``model.width=32``).
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` with a
message that names the key and the fix. Each method's own rules (and its default
backbone) come from the method registry (:func:`method_rules`); reading and writing
TOML is ``fedssl.config_io``.

The sections and their defaults live in ``fedssl.config_schema`` (re-exported here), which also
says what each default was chosen on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping, Protocol

from fedssl.config_io import (build, check, dumps_toml, load_toml, merge, parse_override,  # noqa: F401 (re-exported)
                              to_dict)
from fedssl.config_io import check as _check
from fedssl.config_schema import (AlignmentConfig, CalibrationConfig, DeviceProfile, DevicesConfig,  # noqa: F401
                                 EvalConfig, FlowerConfig, InversionConfig, LayerwiseConfig, MAEConfig, ModelConfig,
                                 PrivacyConfig, RunConfig, SplitConfig, SSLConfig)
from fedssl.config_schema import SECAGG_MAX_CLIENTS
from fedssl.devices.profiles import validate_devices
from fedssl.errors import ConfigError

CASCADES = ("stagewise", "independent", "end-to-end")  # FedMAE: how the one-block MAEs become one encoder
OBJECTIVES = ("mocov2", "mocov3", "simclr", "byol")
DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist", "imagefolder", "synthetic")
PARTITION_NAMES = ("iid", "dirichlet", "pathological", "shards")
DEVICE_PATTERN = re.compile(r"cpu|cuda(?::(\d+))?")  # engines.local.resolve_device: is it on this machine
RAY_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[1-9]\d{0,4})")  # flower.ray_address


# ---------------------------------------------------------------- validation


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"unknown value {value!r}; choose one of {', '.join(choices)}")


class MethodRules(Protocol):
    """What building and validating a config asks of the methods (``fedssl.methods`` registers its registry here
    when it is imported, which ``import fedssl`` does: every method imports this module, so it cannot import them)."""

    names: tuple[str, ...]

    def default_model(self, method: str) -> Mapping[str, Any]:
        """The method's default backbone: [model] settings for a config that sets no ``model.arch``."""

    def validate(self, cfg: RunConfig) -> None:
        """The method's own rules (ConfigError naming the key and the fix)."""


_method_rules: list[MethodRules] = []


def register_method_rules(rules: MethodRules) -> None:
    _method_rules[:] = [rules]


def method_rules() -> MethodRules:
    if not _method_rules:
        raise RuntimeError("no method registry: import fedssl (its package imports fedssl.methods) before configs")
    return _method_rules[0]


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError for a value out of range; return cfg unchanged otherwise.

    The sections run in a fixed order, so a config with several faults always names the same one first.
    """
    for section in (_validate_choices, _validate_run, _validate_model, _validate_ssl, _validate_split,
                    _validate_eval, _validate_staged, _validate_flower, _validate_mae, _validate_privacy):
        section(cfg)
    validate_devices(cfg.devices)
    method_rules().validate(cfg)
    return cfg


def _validate_choices(cfg: RunConfig) -> None:
    """The named choices: method, dataset, partition, optimizer, schedule, backbone, SSL objective."""
    _one_of(cfg.method, method_rules().names, "method")
    _one_of(cfg.dataset, DATASET_NAMES, "dataset")
    _one_of(cfg.partition, PARTITION_NAMES, "partition")
    _one_of(cfg.optimizer, ("sgd", "adamw"), "optimizer")
    _one_of(cfg.lr_schedule, ("cosine", "constant"), "lr_schedule")
    _one_of(cfg.model.arch, ("resnet", "vit"), "model.arch")
    _one_of(cfg.model.norm, ("group", "batch"), "model.norm")
    _one_of(cfg.model.stem, ("cifar", "imagenet"), "model.stem")
    _one_of(cfg.ssl.objective, OBJECTIVES, "ssl.objective")
    _one_of(cfg.ssl.augment, ("mocov2", "simclr", "byol"), "ssl.augment")


def _validate_run(cfg: RunConfig) -> None:
    """The top-level ranges: partition, rounds and sampling, local training, checkpoints, device."""
    _check(cfg.alpha > 0, "alpha", f"{cfg.alpha} must be > 0 (smaller = more non-IID)")
    _check(cfg.classes_per_client >= 1, "classes_per_client", "must be >= 1")
    _check(cfg.shards_per_client >= 1, "shards_per_client", "must be >= 1")
    _check(cfg.rounds >= 1, "rounds", "must be >= 1")
    _check(0 < cfg.sample_fraction <= 1, "sample_fraction", f"{cfg.sample_fraction} must be in (0, 1]")
    _check(0 <= cfg.dropout < 1, "dropout", f"{cfg.dropout} must be in [0, 1) (some client must return)")
    _check(0 <= cfg.server_momentum < 1, "server_momentum", f"{cfg.server_momentum} must be in [0, 1) (0 = FedAvg)")
    _check(cfg.server_lr > 0, "server_lr", f"{cfg.server_lr} must be > 0 (1 = FedAvg)")
    _check(cfg.local_epochs >= 1, "local_epochs", "must be >= 1")
    _check(cfg.local_steps >= 0, "local_steps", "must be >= 0 (0 = use local_epochs)")
    _check(cfg.batch_size >= 2, "batch_size", "must be >= 2 (two views need a pair)")
    _check(cfg.lr > 0, "lr", "must be > 0")
    _check(0 <= cfg.warmup_rounds < cfg.rounds, "warmup_rounds", f"{cfg.warmup_rounds} must be in [0, rounds)")
    _check(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    _check(0 <= cfg.sgd_momentum < 1, "sgd_momentum", "must be in [0, 1)")
    _check(cfg.image_size >= 0, "image_size", "must be >= 0 (0 = native size)")
    _check(cfg.threads >= 0, "threads", "must be >= 0")
    _check(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    _check(DEVICE_PATTERN.fullmatch(cfg.device) is not None, "device", f"{cfg.device!r}: use cpu, cuda or cuda:N")


def _validate_model(cfg: RunConfig) -> None:
    """[model]: ranges (its named choices: :func:`_validate_choices`)."""
    _check(cfg.model.width >= 1, "model.width", "must be >= 1")
    _check(cfg.model.group_channels >= 0, "model.group_channels", "must be >= 0 (0 = up to 32 groups of >= 2)")
    _check(len(cfg.model.blocks_per_stage) >= 1 and min(cfg.model.blocks_per_stage) >= 1,
           "model.blocks_per_stage", "needs one or more stages of >= 1 block, e.g. [2, 2, 2, 2]")
    _check(cfg.model.depth >= 1 and cfg.model.heads >= 1 and cfg.model.patch_size >= 1,
           "model", "ViT depth, heads and patch_size must be >= 1")


def _validate_ssl(cfg: RunConfig) -> None:
    """[ssl]: ranges (its named choices: :func:`_validate_choices`)."""
    _check(cfg.ssl.temperature > 0, "ssl.temperature", "must be > 0")
    _check(cfg.ssl.queue_size >= 0, "ssl.queue_size", "must be >= 0")
    _check(0 <= cfg.ssl.momentum <= 1, "ssl.momentum", "must be in [0, 1]")
    _check(cfg.ssl.proj_hidden >= 1 and cfg.ssl.proj_dim >= 1, "ssl", "projection sizes must be >= 1")


def _validate_split(cfg: RunConfig) -> None:
    """[split]: the split-learning protocol's choices and ranges."""
    _one_of(cfg.split.queue, ("shared", "per_client"), "split.queue")
    _one_of(cfg.split.simulate, ("batched", "loop"), "split.simulate")
    _check(cfg.split.cut >= 1, "split.cut", "must be >= 1 (1 = the client runs the stem only)")
    _check(cfg.split.client_batch >= 1, "split.client_batch", "must be >= 1")
    _check(0 < cfg.split.clients_per_step <= 1, "split.clients_per_step", "must be in (0, 1]")
    _check(cfg.split.sync_every >= 1, "split.sync_every", "must be >= 1")


def _validate_eval(cfg: RunConfig) -> None:
    """[eval]: kNN, linear probe, validation split and fine-tuning."""
    _check(cfg.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _check(cfg.eval.knn_t > 0, "eval.knn_t", "must be > 0")
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    _check(0 <= cfg.eval.val_fraction <= 0.5, "eval.val_fraction", f"{cfg.eval.val_fraction} must be in [0, 0.5] "
           "(0 = no validation split)")
    _check(cfg.eval.probe_epochs >= 1, "eval.probe_epochs", "must be >= 1")
    _check(cfg.eval.finetune_epochs >= 1, "eval.finetune_epochs", "must be >= 1")
    _check(cfg.eval.finetune_lr > 0, "eval.finetune_lr", "must be > 0")
    _check(cfg.eval.finetune_weight_decay >= 0, "eval.finetune_weight_decay", "must be >= 0")
    _check(cfg.eval.finetune_batch_size >= 1, "eval.finetune_batch_size", "must be >= 1")


def clients_per_round(sample_fraction: float, num_clients: int) -> int:
    """Clients a round samples: ceil(fraction * N), at least 1, at most N (the sampler's and the accountant's m)."""
    return min(num_clients, max(1, math.ceil(sample_fraction * num_clients)))


def _validate_flower(cfg: RunConfig) -> None:
    fl = cfg.flower
    _check(fl.round_timeout > 0, "flower.round_timeout", "must be > 0 seconds")
    _check(fl.connect_timeout > 0, "flower.connect_timeout", "must be > 0 seconds")
    _check(fl.client_cpus > 0, "flower.client_cpus", "must be > 0 (CPU cores per simulated ClientApp)")
    gpus = fl.client_gpus
    _check(0 <= gpus <= 1 or (gpus > 1 and float(gpus).is_integer()), "flower.client_gpus",
           f"{gpus} must be a share of one GPU in [0, 1] (0.5 = two ClientApps per GPU) or a whole number")
    _check(not fl.ray_address.startswith("ray://"), "flower.ray_address", "ray:// is Ray Client, which Flower's "
           "simulation does not use; give the head's address HOST:PORT (the one `ray start --head` prints)")
    address = RAY_ADDRESS.fullmatch(fl.ray_address)
    _check(fl.ray_address == "" or (address is not None and int(address["port"]) <= 65535), "flower.ray_address",
           f"{fl.ray_address!r}: use \"\" (Flower starts Ray here) or the head of a Ray cluster as HOST:PORT, "
           "e.g. 10.0.0.5:6379")
    _check(0 < fl.secagg_shares <= 1, "flower.secagg_shares", f"{fl.secagg_shares} must be in (0, 1] (1 = all)")
    _check(0 < fl.secagg_threshold <= 1, "flower.secagg_threshold", f"{fl.secagg_threshold} must be in (0, 1]")
    _check(fl.secagg_clip > 0, "flower.secagg_clip", "must be > 0 (the largest change of a value in one round)")
    if fl.secagg:
        sampled = clients_per_round(cfg.sample_fraction, cfg.clients)
        _check(2 <= sampled <= SECAGG_MAX_CLIENTS, "flower.secagg", f"SecAgg+ sums 2 to {SECAGG_MAX_CLIENTS} "
               f"clients a round but this config samples {sampled}; raise clients or sample_fraction")


def _validate_staged(cfg: RunConfig) -> None:
    """[layerwise], [calibration], [alignment]: ranges (which methods read them: the methods' own rules)."""
    lw, cal, al = cfg.layerwise, cfg.calibration, cfg.alignment
    _one_of(lw.objective, OBJECTIVES, "layerwise.objective")
    _one_of(cal.scope, ("model", "active"), "calibration.scope")
    _one_of(al.distance, ("cosine", "mse"), "alignment.distance")
    _check(lw.blocks_per_stage >= 1, "layerwise.blocks_per_stage", "must be >= 1")
    _check(lw.rounds_per_stage >= 0, "layerwise.rounds_per_stage", "must be >= 0 (0 = split rounds evenly)")
    _check(0 <= cal.aux_fraction <= 0.5, "calibration.aux_fraction", f"{cal.aux_fraction} must be in [0, 0.5] "
           "(0 = off; the clients keep the rest)")
    _check(cal.steps >= 1, "calibration.steps", "must be >= 1")
    _check(cal.lr >= 0, "calibration.lr", "must be >= 0 (0 = the round's client learning rate)")
    _check(cal.batch_size == 0 or cal.batch_size >= 2, "calibration.batch_size", "must be 0 (= batch_size) or >= 2")
    _check(al.weight >= 0, "alignment.weight", "must be >= 0 (0 = off)")


def _validate_mae(cfg: RunConfig) -> None:
    """[mae]: ranges (what fedmae needs of the backbone: its own rules)."""
    mae = cfg.mae
    _one_of(mae.cascade, CASCADES, "mae.cascade")
    _check(0 < mae.mask_ratio < 1, "mae.mask_ratio", f"{mae.mask_ratio} must be in (0, 1), e.g. 0.75")
    _check(mae.decoder_width >= 4 and mae.decoder_width % 4 == 0, "mae.decoder_width",
           "must be a positive multiple of 4 (sin-cos positions), e.g. 128")
    _check(mae.decoder_depth >= 1, "mae.decoder_depth", "must be >= 1")
    _check(mae.decoder_heads >= 1 and mae.decoder_width % mae.decoder_heads == 0, "mae.decoder_heads",
           f"must divide mae.decoder_width = {mae.decoder_width}")
    _check(mae.pictures >= 0, "mae.pictures", "must be >= 0 (0 = no reconstruction pictures)")


def _validate_privacy(cfg: RunConfig) -> None:
    """[privacy]: ranges, whether or not it is enabled (which methods take it: the methods' own rules)."""
    p = cfg.privacy
    _check(math.isfinite(p.clip_norm) and p.clip_norm > 0, "privacy.clip_norm",
           f"{p.clip_norm} must be a finite number > 0 (the L2 bound on a client's update), e.g. 1.0")
    _check(math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0, "privacy.noise_multiplier",
           f"{p.noise_multiplier} must be a finite number >= 0 (noise std / clip_norm; 0 = clipping only), e.g. 1.0")
    _check(0 < p.delta < 1, "privacy.delta", f"{p.delta} must be in (0, 1), and below 1 / clients, e.g. 1e-5")
    # SecAgg+ hands the server one sample-weighted mean of the changes; DP-FedAvg's bound needs the uniform sum of
    # clipped updates plus noise at the server: the two do not compose in this loop (README "Privacy")
    _check(not (p.enabled and cfg.flower.secagg), "privacy.enabled",
           "DP-FedAvg and flower.secagg cannot be combined yet (SecAgg+ returns a sample-weighted mean, DP needs the "
           "uniform sum of clipped updates); set one of them to false")


# ---------------------------------------------------------------- building (parsing and writing: fedssl.config_io)


def make_config(base: Mapping[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (),
                **top: Any) -> RunConfig:
    """Build and validate a RunConfig from a TOML-like dict, ``--set`` strings and keyword overrides."""
    values: dict[str, Any] = json.loads(json.dumps(dict(base or {})))  # deep copy of plain data
    for key, value in top.items():
        if value is not None:
            values[key] = value
    for item in overrides:
        path, value = parse_override(item)
        merge(values, path, value)
    _default_backbone(values)
    return validate(build(RunConfig, values))


def _default_backbone(values: dict[str, Any]) -> None:
    """A config that names no ``model.arch`` gets the method's default backbone (its [model] keys, the user's win)."""
    model = values.get("model", {})
    method = values.get("method", RunConfig.method)
    if not isinstance(model, dict) or "arch" in model or method not in method_rules().names:
        return  # a malformed [model] or an unknown method: the validation names it
    values["model"] = {**method_rules().default_model(method), **model}


def config_hash(cfg: RunConfig) -> str:
    """A short stable digest of everything that changes what a run computes.

    A config without a fleet (the default ``[devices]``) or DP (the default ``[privacy]``) digests as it did before
    that section existed, so the checkpoints of older runs still resume.
    """
    values = to_dict(cfg)
    if cfg.devices == DevicesConfig():
        del values["devices"]
    if cfg.privacy == PrivacyConfig():  # likewise for runs from before [privacy]
        del values["privacy"]
    for where in ("client_gpus", "ray_address"):  # where it ran, not what it computed: resumable on another cluster
        del values["flower"][where]
    if not cfg.flower.secagg:  # SecAgg+ off (the default): its settings compute nothing; runs from before it resume
        for key in [k for k in values["flower"] if k.startswith("secagg")]:
            del values["flower"][key]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def validate_inversion(inv: InversionConfig) -> InversionConfig:
    """The attack's settings (``fedssl attack`` flags) in range, or one ConfigError naming the flag; the cuts
    against the architecture are checked where the encoder is known (``fedssl.privacy.inversion``)."""
    if not inv.cuts or any(c < 1 for c in inv.cuts):
        raise ConfigError(f"--cuts {' '.join(map(str, inv.cuts))}: give one or more cuts >= 1, e.g. --cuts 1 2 3")
    for name in ("steps", "images", "shown", "batch_size", "hidden"):
        if getattr(inv, name) < 1:
            label = f"--{name}" if name in ("steps", "images") else f"InversionConfig.{name}"  # the CLI's flags
            raise ConfigError(f"{label} = {getattr(inv, name)} must be >= 1, e.g. {getattr(InversionConfig, name)}")
    if not (inv.lr > 0 and 0 < inv.aux_share < 1):
        raise ConfigError(f"the attack needs lr > 0 and 0 < aux_share < 1 (got {inv.lr}, {inv.aux_share})")
    return inv
