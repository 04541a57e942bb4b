"""Honest evaluation of an encoder: weighted kNN and a linear probe on FROZEN features, and fine-tuning.

The protocol is the same for every method: features are extracted once with
the encoder in eval mode and no gradients; the kNN classifier and the linear
probe are fitted on the labelled TRAIN split only and scored once on the
TEST split. Nothing is selected on the test split: the probe trains for a
fixed number of epochs, and test labels are read only when scoring.
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EvalResult", "PixelEncoder", "evaluate", "extract_features", "fine_tune", "knn_accuracy", "linear_probe"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Tensor,
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Features of ``images`` from the frozen ``encoder``.

    images: (N, C, H, W), usually uint8; each batch is moved to ``device``
    and passed through ``transform`` (e.g. to float + normalise) and then the
    encoder, which must already live on ``device`` and return (B, D).
    The encoder runs in eval mode; every submodule's train/eval flag is
    restored afterwards. Returns (N, D) float32 on the CPU.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    try:
        chunks: list[Tensor] = []
        for start in range(0, images.shape[0], batch_size):
            batch = transform(images[start : start + batch_size].to(device))  # (B, C, H, W)
            features = encoder(batch)  # (B, D)
            if features.ndim != 2:
                raise ValueError(
                    f"the encoder must return (batch, dim) features, got shape {tuple(features.shape)}; pool it first"
                )
            chunks.append(features.float().cpu())
    finally:
        for module, training in modes.items():
            module.train(training)
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)  # (N, D)


def _num_classes(train_labels: Tensor, num_classes: int | None) -> int:
    """Classes from the TRAIN labels only: test labels never shape the classifier."""
    inferred = int(train_labels.max()) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but train labels go up to {inferred - 1}")
    return num_classes


def _check_split(features: Tensor, labels: Tensor, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(
            f"{name}: expected features (N, D) and labels (N,) with N > 0, "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}"
        )


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Weighted kNN accuracy (InstDisc / MoCo protocol).

    Cosine similarity to every train feature; the top-``k`` neighbours
    (``k`` capped at the train size) each vote for their label with weight
    ``exp(sim / temperature)``; the class with the largest total wins (ties:
    the lowest class index). Test queries are processed ``chunk`` at a time.
    """
    _check_split(train_features, train_labels, "train")
    _check_split(test_features, test_labels, "test")
    if k <= 0 or temperature <= 0 or chunk <= 0:
        raise ValueError(f"k, temperature and chunk must be positive, got {k}, {temperature}, {chunk}")
    classes = _num_classes(train_labels, num_classes)
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)  # (Ntr, D)
    bank_labels = train_labels.long()

    predictions: list[Tensor] = []
    for start in range(0, test_features.shape[0], chunk):
        queries = F.normalize(test_features[start : start + chunk].float(), dim=1)  # (B, D)
        sim, idx = (queries @ bank.T).topk(k, dim=1)  # (B, k)
        weights = (sim / temperature).exp()  # (B, k)
        votes = torch.zeros(queries.shape[0], classes).scatter_add_(1, bank_labels[idx], weights)  # (B, classes)
        predictions.append(votes.argmax(dim=1))
    predicted = torch.cat(predictions)  # (Nte,)
    return int((predicted == test_labels.long()).sum()) / predicted.shape[0]


def _train_statistics(train: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of the TRAIN features: (1, D) each."""
    return train.mean(dim=0, keepdim=True), train.std(dim=0, keepdim=True).clamp_min(eps)


def _standardise(train: Tensor, test: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Standardise both splits with the TRAIN mean and std."""
    mean, std = _train_statistics(train, eps)
    return (train - mean) / std, (test - mean) / std


@torch.no_grad()
def _accuracy(classifier: nn.Linear, features: Tensor, labels: Tensor, chunk: int = 8192) -> float:
    correct = sum(
        int((classifier(features[i : i + chunk]).argmax(dim=1) == labels[i : i + chunk]).sum())
        for i in range(0, features.shape[0], chunk)
    )
    return correct / features.shape[0]


def _check_training(epochs: int, batch_size: int, lr: float) -> None:
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")


def _adamw_cosine(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float,
                  steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` with a cosine learning-rate decay to zero over ``steps`` optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


_Forward = Callable[[Tensor], tuple[Tensor, Tensor]]  # batch indices (B,) -> logits (B, classes), labels (B,)


def _train_epochs(forward: _Forward, n: int, *, epochs: int, batch_size: int, optimizer: torch.optim.Optimizer,
                  schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> tuple[float, int]:
    """``epochs`` of cross-entropy steps over ``n`` samples shuffled by ``generator``, ``batch_size`` at a time.

    Returns the last epoch's (sum of per-sample losses, number of correct predictions).
    """
    loss_sum, correct = 0.0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)  # (n,)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]  # (B,)
                logits, labels = forward(idx)  # (B, classes), (B,)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * idx.numel()
                correct += int((logits.argmax(dim=1) == labels).sum())
    return loss_sum, correct


def _zero_linear(dim: int, classes: int) -> nn.Linear:
    """A (dim -> classes) linear layer with zero weight and bias."""
    classifier = nn.Linear(dim, classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return classifier


def _extra_scores(classifier: nn.Linear, train_features: Tensor,
                  extra: dict[str, tuple[Tensor, Tensor]] | None) -> dict[str, float]:
    """``{name}_acc`` for every extra split, standardised with the TRAIN statistics."""
    scores: dict[str, float] = {}
    mean, std = _train_statistics(train_features.float())  # (1, D) each
    for name, (features, labels) in (extra or {}).items():
        _check_split(features, labels, name)
        scores[f"{name}_acc"] = _accuracy(classifier, (features.float() - mean) / std, labels.long())
    return scores


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    extra: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Train a linear classifier on frozen TRAIN features; score it once on TEST.

    Features are standardised with the train statistics. The classifier
    starts at zero and is trained with cross-entropy, AdamW (``lr``,
    ``weight_decay``) and a cosine learning-rate decay over a fixed
    ``epochs`` of shuffled mini-batches (the shuffling is drawn from ``seed``,
    so results are deterministic). No early stopping, no model selection.
    Returns ``{"train_acc", "test_acc", "train_loss"}`` (last-epoch mean loss), plus
    ``{name}_acc`` for every ``extra`` split ``name -> (features, labels)`` (e.g. a validation
    split), scored by the same classifier.
    """
    _check_split(train_features, train_labels, "train")
    _check_split(test_features, test_labels, "test")
    _check_training(epochs, batch_size, lr)
    classes = _num_classes(train_labels, num_classes)
    train_x, test_x = _standardise(train_features.float(), test_features.float())  # (Ntr, D), (Nte, D)
    train_y = train_labels.long()  # (Ntr,)
    n = train_x.shape[0]

    classifier = _zero_linear(train_x.shape[1], classes)
    optimizer, schedule = _adamw_cosine(classifier.parameters(), lr=lr, weight_decay=weight_decay,
                                        steps=epochs * math.ceil(n / batch_size))
    loss_sum, _ = _train_epochs(lambda idx: (classifier(train_x[idx]), train_y[idx]), n, epochs=epochs,
                                batch_size=batch_size, optimizer=optimizer, schedule=schedule,
                                generator=torch.Generator().manual_seed(seed))

    # test labels are read here, once, after training is finished
    scores = {
        "train_acc": _accuracy(classifier, train_x, train_y),
        "test_acc": _accuracy(classifier, test_x, test_labels.long()),
        "train_loss": loss_sum / n,
    }
    return {**scores, **_extra_scores(classifier, train_features, extra)}


@dataclass(frozen=True)
class EvalResult:
    """Accuracies (fractions) of one frozen encoder; ``probe_acc`` is None when the probe was skipped.

    ``val_*``: the same classifiers scored on a validation split carved from the TRAIN split
    (``eval.val_fraction``); None where the run has none.
    """

    knn_acc: float
    probe_acc: float | None
    feature_dim: int
    val_knn_acc: float | None = None
    val_probe_acc: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """Every field; the ``val_*`` ones only where a validation split was scored."""
        return {k: v for k, v in asdict(self).items() if not (k.startswith("val_") and v is None)}


class PixelEncoder(nn.Module):
    """The raw-pixels baseline: normalised images, average-pooled to at most ``side`` x ``side``, flattened.

    (N, C, H, W) -> (N, C * min(H, side)^2). It has no weights: what a kNN or a probe gets from it is
    what the pixels alone give, the floor an encoder must clear.
    """

    def __init__(self, side: int = 32) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > self.side:
            x = F.adaptive_avg_pool2d(x, self.side)  # (N, C, side, side)
        return x.flatten(1)


def evaluate(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    transform: Callable[[Tensor], Tensor],
    knn_k: int = 200,
    knn_t: float = 0.1,
    probe: bool = True,
    probe_epochs: int = 100,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
) -> EvalResult:
    """Extract frozen features once, then kNN and (optionally) the linear probe on them.

    ``val``: (images, labels) of a validation split, scored by the same kNN bank and probe.
    """
    def features(images: Tensor) -> Tensor:
        return extract_features(encoder, images, transform=transform, batch_size=batch_size, device=device)

    train_features, test_features = features(train_images), features(test_images)
    val_features = None if val is None else features(val[0])

    def knn(queries: Tensor, labels: Tensor) -> float:
        return knn_accuracy(train_features, train_labels, queries, labels, k=knn_k, temperature=knn_t)

    scores: dict[str, float] = {}
    if probe:
        extra = {} if val_features is None else {"val": (val_features, val[1])}
        scores = linear_probe(train_features, train_labels, test_features, test_labels, epochs=probe_epochs,
                              seed=seed, extra=extra)
    return EvalResult(knn_acc=knn(test_features, test_labels), probe_acc=scores.get("test_acc"),
                      feature_dim=train_features.shape[1],
                      val_knn_acc=None if val_features is None else knn(val_features, val[1]),
                      val_probe_acc=scores.get("val_acc"))


def _trainable_copy(encoder: nn.Module, device: str | torch.device) -> nn.Module:
    """A deep copy of ``encoder`` on ``device`` with every parameter trainable (frozen flags lifted)."""
    model = copy.deepcopy(encoder).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _logit_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, *, transform: Callable[[Tensor], Tensor],
                    batch_size: int, device: str | torch.device) -> float:
    """Accuracy of ``classifier`` (images -> logits) in eval mode, no gradients."""
    logits = extract_features(classifier, images, transform=transform, batch_size=batch_size,
                              device=device)  # (N, classes)
    return float((logits.argmax(dim=1) == labels.long()).float().mean())


def fine_tune(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    augment: Callable[[Tensor], Tensor],
    transform: Callable[[Tensor], Tensor],
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Fine-tune a COPY of the encoder with a linear head on the TRAIN split; score it once on TEST.

    Every encoder parameter trains (frozen flags of layer-wise training are lifted on the copy),
    with AdamW and a cosine decay over a fixed number of ``epochs`` of shuffled mini-batches;
    ``augment`` maps a uint8 batch (B, C, H, W) to normalised training views (random crop + flip),
    ``transform`` to normalised test images. ``seed`` fixes the head's init, the order and the
    augmentations. No early stopping, no selection. Returns ``{"train_acc", "test_acc", "train_loss"}``
    (train accuracy and loss: running means over the last epoch).
    """
    _check_images(train_images, train_labels, "train")
    _check_images(test_images, test_labels, "test")
    _check_training(epochs, batch_size, lr)
    classes = _num_classes(train_labels, num_classes)
    model = _trainable_copy(encoder, device)
    n = train_images.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(int(getattr(model, "feature_dim")), classes).to(device)
        optimizer, schedule = _adamw_cosine([*model.parameters(), *head.parameters()], lr=lr,
                                            weight_decay=weight_decay, steps=epochs * math.ceil(n / batch_size))
        generator = torch.Generator().manual_seed(seed)
        model.train()

        def forward(idx: Tensor) -> tuple[Tensor, Tensor]:
            labels = train_labels[idx].to(device)  # (B,)
            return head(model(augment(train_images[idx].to(device)))), labels  # (B, classes), (B,)

        loss_sum, correct = _train_epochs(forward, n, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                                          schedule=schedule, generator=generator)
    # test labels are read here, once, after training is finished
    test_acc = _logit_accuracy(nn.Sequential(model, head), test_images, test_labels, transform=transform,
                               batch_size=batch_size, device=device)
    return {"train_acc": correct / n, "test_acc": test_acc, "train_loss": loss_sum / n}


def _check_images(images: Tensor, labels: Tensor, name: str) -> None:
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"{name} split: need (N, C, H, W) images and (N,) labels with N > 0, "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
