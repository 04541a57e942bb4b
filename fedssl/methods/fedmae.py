"""FedMAE: one-block masked auto-encoders trained by weak clients, cascaded by the server into a ViT.

Only the paper's abstract is public; what follows is this project's design (see
``../shared/METHODS.md`` section 3 and the README):

- every client trains a ONE-block MAE (``fedssl.models.mae``): patch embedding + fixed
  sin-cos positions, one transformer block on the visible patches (``mae.mask_ratio``),
  a light decoder, normalised-pixel MSE on the masked patches;
- ``mae.cascade = "stagewise"`` (default): stage k trains block k by FedAvg rounds on top
  of the frozen cascade of blocks 1..k-1, which runs on the visible patches only, without
  grad (clients download each frozen block once, counted); at the end of the stage block k
  joins the cascade. After L stages the cascade is an L-block ViT encoder;
- ``"independent"``: every block trains on the (frozen) patch embeddings alone and the
  blocks are stacked for the final encoder (the cheap ablation; clients hold one block);
- ``"end-to-end"``: one stage, FedAvg of the whole L-block MAE (what FedMAE is compared with);
- the patch embedding trains with the first block and is frozen afterwards; the encoder's
  final LayerNorm and the decoder train in every stage and travel with the active block.

It is the stage machinery of LW-FedSSL (``StagedFedSSL``: schedule, frozen-layer
downloads, FedAvg of the active part, per-stage cosine LR) with an MAE in place of the
contrastive model: one mechanism, not two.
"""

from __future__ import annotations

from pathlib import Path

from fedssl.config import RunConfig, check
from fedssl.data.augment import MaskedViewAugment
from fedssl.data.datasets import ImageData
from fedssl.methods.base import MethodContext, build_backbone
from fedssl.methods.layerwise import StagedFedSSL
from fedssl.models.encoder import Encoder
from fedssl.models.mae import MaskedAutoencoder
from fedssl.models.staged import StagedEncoder
from fedssl.reconstructions import save_reconstructions
from fedssl.stages import StageSchedule
from fedssl.training import Augment, derive_seed

PICTURE_SEED = 0xFAE  # the same patches are hidden in every stage's pictures


class FedMAE(StagedFedSSL):
    name = "fedmae"
    figures_title = "Reconstructions at the end of each stage: masked input / reconstruction / original"
    calibrates = False
    default_model = {"arch": "vit", "width": 64, "depth": 4, "heads": 4, "patch_size": 4}  # configs/cifar10/fedmae.toml

    @classmethod
    def mode_of(cls, cfg: RunConfig) -> str:
        """``independent``: every block trains on the stem's output alone; else block k on the frozen 1..k-1."""
        return "independent" if cfg.mae.cascade == "independent" else "layerwise"

    @classmethod
    def schedule_for(cls, cfg: RunConfig, encoder: Encoder | None = None) -> StageSchedule:
        """``end-to-end``: ONE stage of every block over all rounds (the FedAvg of the whole MAE it is compared
        with; the ``[layerwise]`` stage settings do not apply to it)."""
        if cfg.mae.cascade == "end-to-end":
            return StageSchedule.single(cfg, encoder)
        return super().schedule_for(cfg, encoder)

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """A ViT whose patches the mask ratio leaves both visible and hidden."""
        check(cfg.model.arch == "vit", "model.arch", "fedmae trains ViT blocks; set model.arch = \"vit\"")
        if cfg.image_size:
            check(cfg.image_size % cfg.model.patch_size == 0, "model.patch_size",
                  f"{cfg.model.patch_size} does not divide image_size {cfg.image_size}; e.g. 16 for 224x224")
            patches = (cfg.image_size // cfg.model.patch_size) ** 2
            visible = int(patches * (1 - cfg.mae.mask_ratio))
            check(1 <= visible < patches, "mae.mask_ratio", f"{cfg.mae.mask_ratio} leaves {visible} of {patches} "
                  "patches visible; choose a ratio that keeps at least one patch visible and hides at least one")
        super().validate(cfg)

    @classmethod
    def build_model(cls, ctx: MethodContext) -> MaskedAutoencoder:  # type: ignore[override]
        backbone = build_backbone(ctx)
        schedule = cls.schedule_for(ctx.cfg, backbone)
        model = MaskedAutoencoder(StagedEncoder(backbone, schedule.stage_ends), ctx.cfg.ssl, ctx.cfg.mae)
        model.set_stage(schedule.stage(0))
        return model.to(ctx.device)

    @classmethod
    def build_augment(cls, ctx: MethodContext) -> Augment:
        info = ctx.info
        return MaskedViewAugment(ctx.image_size, info.mean, info.std, channels=info.channels).to(ctx.device)

    @classmethod
    def describe(cls, cfg: RunConfig) -> str:
        schedule, mae = cls.schedule_for(cfg), cfg.mae
        stages = ("one stage: FedAvg of the whole MAE" if mae.cascade == "end-to-end" else
                  f"{schedule.num_stages} stages of {cfg.layerwise.blocks_per_stage} block(s)")
        return (f"FedMAE, {mae.cascade} cascade ({stages}), rounds per stage {list(schedule.stage_rounds)}; mask ratio "
                f"{mae.mask_ratio:g}, decoder {mae.decoder_depth} block(s) of width {mae.decoder_width}, "
                f"{'normalised-pixel' if mae.norm_pix else 'pixel'} targets. The cascade design is this project's: "
                "only the paper's abstract is public.")

    @classmethod
    def reference_name(cls, cfg: RunConfig) -> str:
        return f"end-to-end federated MAE of the same depth ({cfg.model.depth} blocks, every block trained)"

    def stage_ends_at(self, round_index: int) -> bool:
        """Whether ``round_index`` is the last round of its stage."""
        s = self.schedule.stage_index(round_index)
        return round_index + 1 == self.schedule.first_round(s) + self.schedule.stage_rounds[s]

    def write_round_figures(self, round_index: int, folder: Path, test: ImageData) -> list[Path]:
        """At the end of each stage: masked input / reconstruction / original of the first test images."""
        count = min(self.cfg.mae.pictures, len(test))
        if not count or not self.stage_ends_at(round_index):
            return []
        stage = self.enter_round(round_index)
        info = self.ctx.info
        path = folder / f"reconstructions-stage{stage.index + 1}.png"
        title = (f"stage {stage.index + 1}/{self.schedule.num_stages} (round {round_index + 1}): "
                 f"{len(stage.held) - 1} block(s), mask {self.cfg.mae.mask_ratio:g}")
        images = test.images[:count].to(self.ctx.device)
        return [save_reconstructions(self.global_model, images, info.mean, info.std, path, title=title,  # type: ignore[arg-type]
                                     seed=derive_seed(self.cfg.seed, PICTURE_SEED))]
