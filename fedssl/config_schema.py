"""The run configuration's sections as typed frozen dataclasses: the one home of every default.

``fedssl.config`` builds and validates them (and re-exports them); nothing else sets a default.

What each default was chosen on. The recipe defaults were checked on a VALIDATION split (a fifth of
the CIFAR-10 training subset held out before partitioning, ``eval.val_fraction = 0.2``; never the test
split) by ``python benchmarks/recipes.py`` (one factor at a time from a FedMoCo recipe, 10 Dirichlet-0.5
clients, ResNet-10 width 16; benchmarks/results/recipes.md, 2026-12-01). That split has 1,017 images,
so one kNN accuracy carries a binomial std of about 1.4 points and a difference of two about 2:

- ``rounds`` x ``local_epochs`` (the passes over the data) is the one factor that beat noise: 12 rounds
  gained +6.5 kNN points over the random init against +4.0 at 6 rounds. The defaults (10 x 1) are a
  budget, not a tuned value; presets set their own.
- ``lr = 0.06``, ``batch_size = 64``, ``ssl.temperature = 0.2``, ``ssl.blur = True`` were kept: the
  alternatives measured (lr 0.03 / 0.12: +1.3; batch 32: +0.3; T 0.1 / 0.5: +0.7 / +1.0; no blur: +1.2
  points) are within that noise, and lr 0.24 was worse (-1.3). The kept values are MoCo v2's.
- ``model.group_channels = 0`` (2 channels per group at width 16) was kept for the same reason (gain
  over random init: 2 / 8 / 16 channels per group +6.1 / +3.1 / +5.6), but its random init is far lower
  (15.4% vs 23.4% at 8), so the shipped presets set 8 (``configs/cifar10/demo.toml``).
- ``server_momentum = 0`` (plain FedAvg): FedAvgM with momentum 0.9 collapsed (-15.0 points).
- The ViT recipe of the presets (AdamW, lr 1e-3, weight decay 0.05, patch 4, no warm-up; ``benchmarks/recipes.py
  --group vit``, FedMoCo v3 on a 4-block ViT of width 64, 2026-12-02) was kept: against its base (-0.4 points
  over random init in 6 rounds) AdamW 3e-3 was worse (-2.3), and patch 8 (+1.1), a 2-round warm-up (+1.8) and
  12 rounds (+2.2) stay within the ~2-point noise of one seed: at this budget nothing in the ViT recipe beats
  noise, which is the measured reason its ceiling gains less than the ResNet's.
- Everything else (queue size, heads, EMA momentum, MocoSFL's split settings, the MAE settings, the
  kNN protocol k = 200 / T = 0.1) is the papers' or their reference code's value, not tuned here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """The backbone. ResNet: CIFAR stem, ``blocks_per_stage`` BasicBlocks of widths width*(1,2,4,8)."""

    arch: str = "resnet"  # resnet | vit
    width: int = 16  # ResNet base width (64 = ResNet-18) or ViT embedding width
    blocks_per_stage: tuple[int, ...] = (1, 1, 1, 1)  # (2, 2, 2, 2) = ResNet-18
    norm: str = "group"  # group (weight-standardised conv + GroupNorm) | batch
    group_channels: int = 0  # GroupNorm: channels per group (0 = up to 32 groups of >= 2 channels)
    stem: str = "cifar"  # cifar (3x3, no pool) | imagenet (7x7/2 + pool)
    patch_size: int = 4  # ViT
    depth: int = 6  # ViT blocks
    heads: int = 3  # ViT


@dataclass(frozen=True)
class SSLConfig:
    """The self-supervised objective and its heads."""

    objective: str = "mocov2"  # used by `centralized`; the fed* methods fix their own
    temperature: float = 0.2
    queue_size: int = 1024  # MoCo v2 negatives kept by a client during its local training
    in_batch_negatives: bool = True  # MoCo v2: also use the other keys of the batch as negatives
    momentum: float = 0.99  # EMA of the momentum / target branch
    proj_hidden: int = 512
    proj_dim: int = 128
    augment: str = "mocov2"  # mocov2 | simclr | byol (kornia, batched)
    blur: bool = True  # the preset's Gaussian blur (False: none, e.g. on 32x32 images)
    exchange_momentum: bool = False  # False: momentum branch re-copied from the online net each round, never sent


@dataclass(frozen=True)
class EvalConfig:
    """Frozen-encoder evaluation: weighted kNN and a linear probe, on the FINAL encoder."""

    knn_k: int = 200
    knn_t: float = 0.1
    every: int = 1  # kNN monitor every N rounds (0 = only at the end)
    # > 0: this share of the TRAINING split is held out as a validation split before partitioning (no client
    # sees it); the kNN monitor and every choice (benchmarks/recipes.py) read it, and the test split is
    # scored once, at the end, on the final encoder. 0: no validation split (the monitor reads the test split).
    val_fraction: float = 0.0
    probe: bool = True
    probe_epochs: int = 100
    batch_size: int = 256
    # `fedssl finetune RUN_DIR`: the whole encoder + a linear head, trained on the labelled train split
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    finetune_weight_decay: float = 0.05
    finetune_batch_size: int = 128


@dataclass(frozen=True)
class SplitConfig:
    """Split federated learning (MocoSFL): the cut, the per-step exchange, client-net synchronisation.

    A round is one synchronisation period: ``sync_every`` steps, each over the
    step's active clients, then the client nets are averaged and broadcast.
    """

    cut: int = 1  # the client holds encoder.layers[:cut] (1 = the stem only)
    client_batch: int = 1  # images per client per step
    clients_per_step: float = 1.0  # fraction of the clients active in each step
    sync_every: int = 50  # local steps between client-net averaging
    sync_momentum: bool = True  # also average the momentum client nets (False = the reference code's behaviour)
    queue: str = "shared"  # shared (one server queue, feature sharing) | per_client
    auto_adjust: bool = False  # the reference scripts' client_batch / clients_per_step for N clients (not sync_every)
    simulate: str = "batched"  # batched (all clients of a step in one vmapped call) | loop (one after another)


@dataclass(frozen=True)
class LayerwiseConfig:
    """Stage-wise training (lw-fedssl, prog-fedssl): each stage adds ``blocks_per_stage`` blocks.

    A "block" is a transformer block (ViT) or a whole ResNet stage (ResNet); the stem
    trains with the first stage. Rounds per stage: ``schedule`` if given, else
    ``rounds_per_stage`` (then ``rounds`` must equal stages x it), else ``rounds`` split evenly.
    """

    blocks_per_stage: int = 1
    rounds_per_stage: int = 0  # 0 = split `rounds` evenly over the stages
    schedule: tuple[int, ...] = ()  # explicit rounds of each stage, e.g. [3, 3, 2]; must sum to `rounds`
    objective: str = "mocov3"  # mocov3 (the paper's) | simclr | byol | mocov2


@dataclass(frozen=True)
class CalibrationConfig:
    """Server-side calibration: after each aggregation the server trains on its own auxiliary unlabeled set."""

    aux_fraction: float = 0.0  # share of the TRAINING split held out for the server (0 = calibration off)
    steps: int = 10  # server SSL steps per round
    lr: float = 0.0  # 0 = the round's client learning rate
    batch_size: int = 0  # 0 = the clients' batch_size
    scope: str = "model"  # model: the whole current model end-to-end (frozen blocks change and are re-sent) | active


@dataclass(frozen=True)
class AlignmentConfig:
    """Representation alignment: local loss += weight x distance(local, received global representation)."""

    weight: float = 0.0  # 0 = off
    distance: str = "cosine"  # cosine | mse


@dataclass(frozen=True)
class MAEConfig:
    """FedMAE: a one-block masked auto-encoder per stage, cascaded by the server (``method = "fedmae"``).

    ``cascade``: ``stagewise`` (stage k trains block k on the output of the frozen blocks 1..k-1),
    ``independent`` (every block trained on the patch embeddings alone, then stacked: the cheap ablation),
    ``end-to-end`` (one stage: FedAvg of the whole multi-block MAE, the reference it is compared with).
    """

    mask_ratio: float = 0.75  # share of the patches hidden from the encoder
    decoder_width: int = 128  # the light decoder, trained by every stage and exchanged with the active block
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix: bool = True  # targets are per-patch normalised pixels
    cascade: str = "stagewise"
    pictures: int = 8  # test images shown masked / reconstructed / original at the end of each stage (0 = none)


@dataclass(frozen=True)
class FlowerConfig:
    """The Flower engine (``fedssl run --engine flower``, ``flwr run .``); the in-process engine ignores it."""

    round_timeout: float = 600.0  # s the server waits for the replies of one exchange; later ones count as failed
    connect_timeout: float = 120.0  # s the server waits at the start for the SuperNode of every client
    client_cpus: float = 1.0  # simulation: CPU cores Ray reserves per ClientApp (at most the machine's)
    # SecAgg+ (Flower's protocol, fedssl.engines.flower.secagg; README "Privacy"): round-based methods only
    secagg: bool = False  # the server receives the sum of a round's client changes, never one client's
    secagg_shares: float = 1.0  # share of a round's clients each client secret-shares its keys with (Flower's num_shares)
    secagg_threshold: float = 0.5  # share of those shares that rebuilds a key: higher = safer, fewer drop-outs survived
    secagg_clip: float = 8.0  # a value's change in one round is clipped to +-this, then quantised to SECAGG_LEVELS steps
    # simulation with device = "cuda": the share of a GPU Ray reserves per ClientApp (0.5 = two per GPU; > 1: a
    # whole number of GPUs); Ray hides the GPUs from a ClientApp that reserves none. Ignored with device = "cpu".
    client_gpus: float = 0.5
    # simulation: "" = Flower starts Ray on this machine; "HOST:PORT" = the head of a running Ray cluster
    # (`ray start --head --port=PORT`, workers `ray start --address=HOST:PORT`): the ClientApps run on its nodes.
    # Where a run ran, not what it computes: neither this nor client_gpus is in the config's hash.
    ray_address: str = ""


SECAGG_LEVELS = 2**22  # SecAgg+ quantisation: [-secagg_clip, secagg_clip] -> integers 0..2**22 (Flower's default)
SECAGG_MODULUS = 2**32  # SecAgg+ masks and sums are mod 2**32 (Flower's default and largest)
SECAGG_MAX_CLIENTS = SECAGG_MODULUS // SECAGG_LEVELS - 1  # more clients in one sum could overflow the modulus


@dataclass(frozen=True)
class DeviceProfile:
    """One device class: what a client of this class can hold, compute and send (``fedssl.devices``).

    The built-in profiles (``fedssl/devices/profiles.py``) say where each of their numbers comes from; a user
    adds their own as ``[devices.profiles.<name>]`` with these keys.
    """

    memory_mib: float = 0.0  # memory a training step may use, MiB (2**20 bytes)
    gflops: float = 0.0  # sustained compute on the training kernels, GFLOP/s (1e9 FLOP/s)
    up_mbps: float = 0.0  # uplink, Mbit/s (1e6 bit/s)
    down_mbps: float = 0.0  # downlink, Mbit/s
    rtt_ms: float = 0.0  # round-trip latency to the server, ms, paid once per exchange
    power_w: float = 0.0  # power while training, W (0 = unknown: no energy figures)
    availability: float = 1.0  # probability of being reachable in a round


@dataclass(frozen=True)
class DevicesConfig:
    """The fleet: which device class each client is, and the simulated clock they give (off while ``mix`` is {}).

    ``mix`` maps profile names (built-in or ``profiles``) to shares summing to 1; every client is given one
    profile for the run (exact shares, seeded order). ``round_deadline_s`` > 0 drops, from a round, every
    client whose simulated time in it exceeds the deadline (counted as late).
    """

    mix: dict[str, float] = field(default_factory=dict)  # e.g. {rpi4 = 0.5, phone = 0.5}; {} = no fleet
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)  # the user's own device classes
    server: str = "server-gpu"  # split methods: the profile of the server that runs the rest of the network
    round_deadline_s: float = 0.0  # simulated seconds a round waits for its clients (0 = no deadline)

    def __hash__(self) -> int:  # the tables' contents (a dict is not hashable): a RunConfig keys caches (Flower nodes)
        return hash((tuple(sorted(self.mix.items())), tuple(sorted(self.profiles.items())), self.server,
                     self.round_deadline_s))


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy of the round-based methods (DP-FedAvg, ``fedssl.privacy.dp``): each
    client's update clipped to ``clip_norm``, Gaussian noise on their sum; epsilon at ``delta`` from the
    accountant (``fedssl.privacy.accountant``). Off unless ``enabled``."""

    enabled: bool = False
    clip_norm: float = 1.0  # L2 bound on a client's update (upload - download) over all exchanged float tensors
    noise_multiplier: float = 1.0  # z: noise std on the sum of updates = z * clip_norm (0 = clipping only, eps = inf)
    delta: float = 1e-5  # the delta of the reported (epsilon, delta); keep it below 1 / clients
    # False: the noise key is drawn from the OS's entropy and kept in the checkpoint only; True: derived from
    # `seed` (identical reruns; the noise is then known to whoever knows the config)
    reproducible_noise: bool = False


@dataclass(frozen=True)
class RunConfig:
    """A whole experiment: method, data, federation, local training, evaluation."""

    method: str = "fedmoco"
    # data
    dataset: str = "cifar10"
    data_dir: str = ""  # "" = $FEDSSL_DATA_DIR or ~/.cache/fedssl/data (downloads there)
    image_size: int = 0  # 0 = the dataset's native size
    download: bool = True
    # federation
    clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    shards_per_client: int = 2
    rounds: int = 10
    sample_fraction: float = 1.0
    dropout: float = 0.0  # probability that a sampled client fails to return its update in a round
    # the server's step (FedAvgM): new = global + server_lr * v, v = server_momentum * v + (average - global);
    # 0 and 1 = plain FedAvg
    server_momentum: float = 0.0
    server_lr: float = 1.0
    # local training
    local_epochs: int = 1
    local_steps: int = 0  # > 0: a fixed number of steps per round instead of epochs
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.06
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine (over rounds) | constant
    warmup_rounds: int = 0  # linear learning-rate warm-up over the first rounds (round-based schedule)
    # run
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0 = leave torch's default
    checkpoint_every: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


@dataclass(frozen=True)
class InversionConfig:
    """The split inversion attack (``fedssl attack RUN_DIR``): not part of a run's config, the attack's own settings.

    For each cut the server trains a decoder from the frozen client layers' activations back to images on its
    OWN auxiliary images (the first ``aux_share`` of the test split: never a client's training image), then
    decodes the activations of ``images`` of the clients' training images (``fedssl.privacy.inversion``).
    """

    cuts: tuple[int, ...] = (1, 2, 3)  # the client-side depths attacked (each 1 <= cut < the encoder's layers)
    steps: int = 300  # decoder training steps per cut (Adam), the same for every cut
    images: int = 64  # clients' training images reconstructed and scored (round-robin over the clients)
    shown: int = 8  # of them, in the picture (original row / reconstruction row per cut)
    batch_size: int = 32  # auxiliary images per decoder step
    lr: float = 1e-3  # Adam learning rate of the decoder
    hidden: int = 32  # channels of the decoder's convolutions (the attack's CPU cost grows with its square)
    aux_share: float = 0.5  # the first share of the test split that is the server's auxiliary set


__all__ = ["AlignmentConfig", "CalibrationConfig", "DeviceProfile", "DevicesConfig", "EvalConfig", "FlowerConfig", "InversionConfig", "LayerwiseConfig", "MAEConfig", "ModelConfig", "PrivacyConfig", "RunConfig", "SSLConfig", "SplitConfig"]
