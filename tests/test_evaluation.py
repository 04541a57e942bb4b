"""Frozen-encoder evaluation: kNN against a hand-written reference, an honest linear probe."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fedssl.evaluation import EvalResult, evaluate, extract_features, knn_accuracy, linear_probe


def _reference_knn(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int, t: float) -> float:
    """One query at a time, plain Python loops."""
    classes = int(train_y.max()) + 1
    correct = 0
    for query, label in zip(test_x, test_y):
        sims = [float(nn.functional.cosine_similarity(query, x, dim=0)) for x in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(k, len(sims))]
        votes = [0.0] * classes
        for i in nearest:
            votes[int(train_y[i])] += float(torch.tensor(sims[i] / t).exp())
        correct += int(max(range(classes), key=lambda c: (votes[c], -c)) == int(label))
    return correct / len(test_y)


def _clusters(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 5
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + spread * torch.randn(n, dim, generator=g), labels


@pytest.mark.parametrize(("k", "chunk"), [(1, 7), (5, 1024), (20, 3)])
def test_knn_matches_reference_loop(k: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(40, 6, generator=g), torch.randn(25, 6, generator=g)
    train_y, test_y = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (25,), generator=g)
    got = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=0.1, chunk=chunk)
    assert got == _reference_knn(train_x, train_y, test_x, test_y, k=k, t=0.1)


def test_knn_perfect_on_separated_clusters() -> None:
    train_x, train_y = _clusters(200, 16, 4, spread=0.1, seed=0)
    test_x, test_y = _clusters(100, 16, 4, spread=0.1, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=10) == 1.0


def test_knn_k_capped_at_train_size() -> None:
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(12, 4, generator=g), torch.randn(9, 4, generator=g)
    train_y, test_y = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (9,), generator=g)
    capped = knn_accuracy(train_x, train_y, test_x, test_y, k=200)
    assert capped == knn_accuracy(train_x, train_y, test_x, test_y, k=12)
    assert capped == _reference_knn(train_x, train_y, test_x, test_y, k=12, t=0.1)


def test_knn_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="train"):
        knn_accuracy(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), torch.zeros(2))


def test_linear_probe_separable_features() -> None:
    train_x, train_y = _clusters(300, 32, 5, spread=1.0, seed=0)
    test_x, test_y = _clusters(150, 32, 5, spread=1.0, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=64)
    assert result["train_acc"] == 1.0
    assert result["test_acc"] >= 0.99


def test_linear_probe_random_labels_is_chance_on_test() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(400, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_y, test_y = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=64)
    assert abs(result["test_acc"] - 0.25) < 0.05  # 3.5 standard errors of a 2000-sample chance estimate


def test_linear_probe_deterministic_by_seed() -> None:
    train_x, train_y = _clusters(200, 8, 3, spread=4.0, seed=0)
    test_x, test_y = _clusters(100, 8, 3, spread=4.0, seed=1)
    run = lambda seed: linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=32, seed=seed)  # noqa: E731
    assert run(0) == run(0)
    assert run(0)["train_loss"] != run(1)["train_loss"]  # the seed really drives the shuffling


def test_linear_probe_reads_test_labels_only_to_score() -> None:
    train_x, train_y = _clusters(200, 8, 3, spread=3.0, seed=0)
    test_x, test_y = _clusters(120, 8, 3, spread=3.0, seed=1)
    honest = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=32)
    shuffled_y = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(9))]
    relabelled = linear_probe(train_x, train_y, test_x, shuffled_y, epochs=5, batch_size=32)
    assert relabelled["train_acc"] == honest["train_acc"]
    assert relabelled["train_loss"] == honest["train_loss"]
    assert relabelled["test_acc"] < honest["test_acc"] - 0.2
    # a test split of different features changes nothing in training either: standardisation uses train only
    moved = linear_probe(train_x, train_y, test_x * 100 + 7, test_y, epochs=5, batch_size=32)
    assert moved["train_loss"] == honest["train_loss"]


class _Encoder(nn.Module):
    """A tiny conv encoder with BatchNorm and dropout, whose outputs depend on train/eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 8)


def _to_float(images: Tensor) -> Tensor:
    return images.float() / 255.0


def test_extract_features_eval_mode_batched_and_restored() -> None:
    encoder = _Encoder()
    encoder.train()
    encoder.net[5].eval()  # a submodule in a different mode must get its own mode back
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    stats_before = encoder.net[1].running_mean.clone()
    feats = extract_features(encoder, images, transform=_to_float, batch_size=3)
    assert feats.shape == (10, 8) and feats.dtype == torch.float32 and not feats.requires_grad
    encoder.eval()
    with torch.no_grad():
        expected = encoder(_to_float(images))
    assert torch.allclose(feats, expected, atol=1e-6)  # eval mode, batching does not change a feature
    encoder.train()
    encoder.net[5].eval()
    extract_features(encoder, images, transform=_to_float, batch_size=4)
    assert encoder.training and encoder.net[1].training and not encoder.net[5].training
    assert torch.equal(encoder.net[1].running_mean, stats_before)  # BatchNorm statistics untouched


def test_extract_features_rejects_unpooled_encoder() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pool"):
        extract_features(nn.Conv2d(3, 2, 1), images, transform=_to_float)


def test_evaluate_end_to_end() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (80,), generator=g)
    # class c has a bright colour channel c: mean-pooled colours point in different directions
    images = torch.randint(0, 50, (80, 3, 4, 4), generator=g, dtype=torch.uint8)
    images[torch.arange(80), labels] += 200
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    result = evaluate(
        encoder, images[:60], labels[:60], images[60:], labels[60:], transform=_to_float, knn_k=5, probe_epochs=100
    )
    assert isinstance(result, EvalResult)
    assert result.knn_acc == 1.0 and result.probe_acc == 1.0 and result.feature_dim == 3
    no_probe = evaluate(encoder, images[:60], labels[:60], images[60:], labels[60:], transform=_to_float, probe=False)
    assert no_probe.as_dict() == {"knn_acc": no_probe.knn_acc, "probe_acc": None, "feature_dim": 3}


class _TinyEncoder(nn.Module):
    """(N, 3, 8, 8) -> (N, 4): a conv and a mean pool, frozen like a layer-wise stage (requires_grad off)."""

    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _colour_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """uint8 (n, 3, 8, 8) images whose class (0..2) is the dominant colour channel, with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randint(0, 60, (n, 3, 8, 8), generator=g)
    images[torch.arange(n), labels] += 150
    return images.to(torch.uint8), labels


def test_fine_tune_trains_a_copy_and_scores_test_once() -> None:
    from fedssl.evaluation import fine_tune

    torch.manual_seed(0)
    encoder = _TinyEncoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_x, train_y = _colour_images(240, 1)
    test_x, test_y = _colour_images(90, 2)
    to_float = lambda x: x.float() / 255  # noqa: E731
    result = fine_tune(encoder, train_x, train_y, test_x, test_y, augment=to_float, transform=to_float, epochs=15,
                       lr=0.05, weight_decay=0.0, batch_size=32, num_classes=3)
    assert result["test_acc"] > 0.9 and result["train_acc"] > 0.8  # chance is 1/3
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items()), "the encoder itself is untouched"
    assert not any(p.requires_grad for p in encoder.parameters())
    again = fine_tune(encoder, train_x, train_y, test_x, test_y, augment=to_float, transform=to_float, epochs=15,
                      lr=0.05, weight_decay=0.0, batch_size=32, num_classes=3)
    assert again == result  # seeded
    renamed = fine_tune(encoder, train_x, (train_y + 1) % 3, test_x, test_y, augment=to_float, transform=to_float,
                        epochs=15, lr=0.05, weight_decay=0.0, batch_size=32, num_classes=3)
    assert renamed["train_acc"] > 0.8 and renamed["test_acc"] < 0.1  # it learns the TRAIN labels; test only scores
