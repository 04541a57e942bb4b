"""FedMAE: masking, the masked-patch loss, the cascade's input, frozen blocks, payloads, real runs, 224x224."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl.cli import main
from fedssl.config import make_config
from fedssl.engines.local import load_federation, start_run
from fedssl.errors import ConfigError
from fedssl.methods.base import ClientResult, MethodContext
from fedssl.methods.fedmae import FedMAE
from fedssl.models.mae import keep_tokens, random_masking, visible_count
from fedssl.models.vit import patchify
from fedssl.resources import REFERENCE_STEP_COST
from tests.helpers import assert_resume_is_exact, tiny_config

MAE = ("method=fedmae", "threads=1", "model.arch=vit", "model.width=16", "model.depth=3", "model.heads=2",
       "model.patch_size=8", "mae.decoder_width=16", "mae.decoder_heads=2", "optimizer=adamw", "lr=0.002",
       "weight_decay=0.05")


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads: None) -> None:
    torch.set_num_threads(1)


def mae_config(*overrides: str):
    return tiny_config(*MAE, "rounds=6", "local_steps=1", "batch_size=8", "mae.pictures=2", *overrides)


def build(cfg) -> tuple[FedMAE, object]:
    fed = load_federation(cfg, pooled=False)
    return FedMAE(MethodContext(cfg, fed.train.info, torch.device("cpu"))), fed


def run_round(method: FedMAE, fed, r: int, clients: list[int]) -> list[ClientResult]:
    results = [method.client.train(method.download(r, c), fed.client_data(c), round_index=r, client_id=c)
               for c in clients]
    method.aggregate(r, results)
    return results


@pytest.mark.parametrize(("patches", "ratio", "visible"), [(64, 0.75, 16), (196, 0.75, 49), (16, 0.5, 8), (10, 0.9, 0)])
def test_masking_keeps_exactly_the_requested_fraction(patches: int, ratio: float, visible: int) -> None:
    assert visible_count(patches, ratio) == visible
    if not visible:
        return
    ids_keep, mask, ids_restore = random_masking(5, patches, ratio)
    assert ids_keep.shape == (5, visible) and mask.shape == (5, patches)
    assert torch.equal(mask.sum(dim=1), torch.full((5,), float(patches - visible)))  # every row: exactly L - K hidden
    for n in range(5):  # the kept patches are exactly the unmasked ones; ids_restore undoes the shuffle
        assert set(ids_keep[n].tolist()) == set(torch.nonzero(mask[n] == 0).flatten().tolist())
    shuffled = torch.argsort(ids_restore, dim=1)
    assert torch.equal(shuffled[:, :visible], ids_keep)
    assert not torch.equal(ids_keep[0].sort().values, ids_keep[1].sort().values)  # per-sample masks


def test_loss_is_the_mse_of_normalised_masked_patches_against_a_hand_written_loop() -> None:
    method, _ = build(mae_config())
    model = method.global_model
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(7)
    loss = model.loss(x)
    torch.manual_seed(7)
    pred, mask = model.reconstruct(x)  # the same masks
    target = patchify(x, 8)  # (3, 16, 192)
    total, count = 0.0, 0
    for n in range(3):
        for patch in range(16):
            if mask[n, patch] == 1:
                t = target[n, patch]
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
                total += float(((pred[n, patch].detach() - t) ** 2).mean())
                count += 1
    assert count == 3 * 12  # 75% of 16 patches hidden in each image
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # only the masked patches' predictions receive gradient
    pred = pred.detach().requires_grad_()
    model.forward_loss(x, pred, mask).backward()
    assert pred.grad is not None
    assert torch.all(pred.grad[mask == 0] == 0) and torch.any(pred.grad[mask == 1] != 0)


@pytest.mark.parametrize("cascade", ["stagewise", "independent"])
def test_cascade_input_of_stage_k_is_the_frozen_blocks_output_on_visible_patches(cascade: str) -> None:
    method, fed = build(mae_config(f"mae.cascade={cascade}"))
    for r in range(4):
        run_round(method, fed, r, [0, 1, 2])
    stage = method.enter_round(4)  # stage 3 of 3: layers 0..2 (patch embedding, blocks 1, 2) built before block 3
    model, layers = method.global_model, method.backbone.layers
    assert stage.first_active == 3 and stage.frozen == ([0, 1, 2] if cascade == "stagewise" else [0])
    seen: list[torch.Tensor] = []
    hook = layers[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    model.loss(x)
    hook.remove()
    torch.manual_seed(3)
    ids_keep, _, _ = random_masking(2, 16, 0.75)  # the masks the loss drew
    model.eval()
    with torch.no_grad():
        expected = keep_tokens(layers[0](x), ids_keep)  # (2, 4, 16): visible patch embeddings
        if cascade == "stagewise":
            expected = layers[2](layers[1](expected))  # the frozen cascade of blocks 1, 2
    assert seen[0].shape == (2, 4, 16)
    torch.testing.assert_close(seen[0], expected)


def test_frozen_blocks_do_not_change_and_only_the_active_part_travels() -> None:
    method, fed = build(mae_config())
    run_round(method, fed, 0, [0, 1, 2])
    run_round(method, fed, 1, [0, 1, 2])
    backbone = method.global_model.encoder.backbone
    frozen_before = {k: v.clone() for k, v in backbone.layers[:2].state_dict().items()}
    payload = method.download(2, 0)  # stage 2: the patch embedding and block 1 frozen, block 2 active
    assert {k.split(".")[3] for k in payload if k.startswith("encoder.backbone.layers.")} == {"0", "1", "2"}
    method.client.train(payload, fed.client_data(0), round_index=2, client_id=0)
    worker = method.client.worker.encoder.backbone
    for name, p in worker.layers[:2].named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, frozen_before[name]), name
    later = method.download(3, 0)  # the frozen layers were received once: only block 2, the norm and the decoder now
    layers = {k.split(".")[3] for k in later if k.startswith("encoder.backbone.layers.")}
    assert layers == {"2"} and any(k.startswith("decoder.") for k in later) and "encoder.backbone.norm.weight" in later
    assert not any(k.startswith("encoder.backbone.layers.3.") for k in later)  # block 3 is not built yet


def test_independent_clients_hold_one_block_and_end_to_end_trains_every_block() -> None:
    independent, fed = build(mae_config("mae.cascade=independent"))
    for r in range(4):
        run_round(independent, fed, r, [0, 1, 2])
    stage = independent.enter_round(4)
    assert stage.held == [0, 3] and stage.bypassed == (1, 2)
    download = independent.download(4, 0)
    assert {k.split(".")[3] for k in download if k.startswith("encoder.backbone.layers.")} == {"3"}
    e2e, _ = build(mae_config("mae.cascade=end-to-end"))
    assert e2e.schedule.num_stages == 1 and e2e.schedule.stage_rounds == (6,)
    assert {k.split(".")[3] for k in e2e.download(0, 0) if k.startswith("encoder.backbone.layers.")} == {"0", "1", "2", "3"}
    assert make_config({}, ["method=fedmae"]).model.arch == "vit"  # its default backbone
    with pytest.raises(ConfigError, match="set model.arch"):
        make_config({}, ["method=fedmae", "model.arch=resnet"])
    with pytest.raises(ConfigError, match="mae.mask_ratio"):
        mae_config("mae.mask_ratio=1.0")


def test_short_real_run_whose_reconstruction_loss_falls(tmp_path: Path, cifar_subset_dir: Path) -> None:
    cfg = mae_config("dataset=cifar10", f"data_dir={cifar_subset_dir}", "clients=4", "partition=dirichlet",
                     "model.patch_size=4", "rounds=6", "local_steps=8", "batch_size=32", "lr=0.003",
                     "eval.every=0", "eval.probe_epochs=5", "mae.pictures=3")
    out = start_run(cfg, tmp_path / "mae")
    losses = [row["loss"] for row in out.metrics]
    assert losses[-1] < losses[0] * 0.9, losses
    assert 0.1 < out.final["knn_acc"] <= 1 and out.final["feature_dim"] == 16
    figures = sorted(p.name for p in (tmp_path / "mae" / "figures").iterdir())
    assert figures == ["reconstructions-stage1.png", "reconstructions-stage2.png", "reconstructions-stage3.png"]
    report = (tmp_path / "mae" / "report.md").read_text()
    assert "figures/reconstructions-stage3.png" in report and "end-to-end federated MAE" in report


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """3 stages of 2 rounds; a real `fedssl run` killed by SIGKILL after its first checkpoint and resumed ends
    exactly like the uninterrupted run: the stage, the frozen blocks, the decoder and who holds which block
    come back (the ledger's bytes say so), and the reconstructions of every stage are written."""
    assert_resume_is_exact(mae_config("eval.every=2"), tmp_path)
    figures = sorted(p.name for p in (tmp_path / "killed" / "figures").iterdir())
    assert figures == ["reconstructions-stage1.png", "reconstructions-stage2.png", "reconstructions-stage3.png"]


def _write_image_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.full((200, 240, 3), 60 + 120 * c, dtype=np.uint8)  # not square, not 224: the loader resizes
            noise = rng.integers(0, 60, size=base.shape, dtype=np.uint8)
            Image.fromarray(base + noise).save(root / name / f"{i}.png")


def test_224x224_user_images_with_patch_16_and_the_end_to_end_reference(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "images")
    cfg = tiny_config(*MAE, "dataset=imagefolder", f"data_dir={tmp_path / 'images'}", "image_size=224",
                      "model.patch_size=16", "model.width=32", "model.depth=2", "clients=2", "rounds=2",
                      "local_steps=1", "batch_size=4", "eval.every=0", "eval.probe_epochs=2", "eval.knn_k=4",
                      "mae.pictures=2")
    out = start_run(cfg, tmp_path / "run")
    assert out.final["feature_dim"] == 32
    step = next(r for r in out.ledger.rows if r["kind"] == "step_cost")
    reference = next(r for r in out.ledger.rows if r["kind"] == REFERENCE_STEP_COST)
    assert reference["peak_training_bytes"] > step["peak_training_bytes"] > 0  # one block trained vs every block
    assert reference["flops_per_image"] > step["flops_per_image"] > 0
    assert "## Client cost vs the reference" in (tmp_path / "run" / "report.md").read_text()
    assert main(["finetune", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert (tmp_path / "run" / "finetune.json").is_file()
