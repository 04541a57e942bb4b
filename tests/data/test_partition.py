"""Partition schemes: exact disjoint coverage, determinism, skew, speed, argument errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedssl.data.partition import PARTITIONS, class_histogram, partition
from fedssl.errors import ConfigError

LABELS = np.random.default_rng(7).integers(0, 10, 2_000)  # (2000,) roughly balanced, unsorted


def assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates inside a client
    everything = np.concatenate(parts)
    assert len(everything) == n  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # ... and every index once


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    hist = class_histogram(labels, parts, 10).astype(float)
    p = hist / hist.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.nansum(p * np.log(p), axis=1).mean())


@pytest.mark.parametrize("scheme", PARTITIONS)
@pytest.mark.parametrize("num_clients", [2, 17, 100])
def test_exact_cover_and_seeded(scheme: str, num_clients: int) -> None:
    k = max(2, -(-10 // num_clients))  # pathological must cover all 10 classes
    parts = partition(LABELS, num_clients, scheme, classes_per_client=k, seed=3)
    assert_exact_cover(parts, len(LABELS), num_clients)
    again = partition(LABELS, num_clients, scheme, classes_per_client=k, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, num_clients, scheme, classes_per_client=k, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_balanced_and_classes_mixed() -> None:
    parts = partition(LABELS, 10, "iid")
    assert {len(p) for p in parts} == {200}
    assert (class_histogram(LABELS, parts, 10) > 0).all()


def test_dirichlet_small_alpha_more_skewed() -> None:
    skewed = mean_label_entropy(LABELS, partition(LABELS, 20, "dirichlet", alpha=0.1))
    mild = mean_label_entropy(LABELS, partition(LABELS, 20, "dirichlet", alpha=100.0))
    assert skewed < 1.2 < 2.0 < mild <= np.log(10)


def test_dirichlet_repairs_empty_clients() -> None:
    labels = np.arange(30) % 3  # 30 samples over 25 clients with tiny alpha: empties are certain
    parts = partition(labels, 25, "dirichlet", alpha=0.01, seed=1)
    assert_exact_cover(parts, 30, 25)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exactly_k_classes(k: int) -> None:
    parts = partition(LABELS, 30, "pathological", classes_per_client=k)
    hist = class_histogram(LABELS, parts, 10)
    assert ((hist > 0).sum(1) == k).all()
    assert (hist.sum(0) == np.bincount(LABELS, minlength=10)).all()  # every class used


def test_shards_on_sorted_labels() -> None:
    labels = np.repeat(np.arange(10), 100)  # (1000,) sorted, 100 per class
    parts = partition(labels, 10, "shards", shards_per_client=2)
    hist = class_histogram(labels, parts, 10)
    assert ((hist > 0).sum(1) <= 2).all()
    assert {len(p) for p in parts} == {100}
    parts = partition(labels, 50, "shards", shards_per_client=3)  # 150 shards: ragged sizes 6-7
    assert_exact_cover(parts, 1000, 50)
    assert ((class_histogram(labels, parts, 10) > 0).sum(1) <= 3).all()


def test_class_histogram_counts() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = class_histogram(labels, [np.array([0, 3]), np.array([1, 2, 4, 5])], 4)
    np.testing.assert_array_equal(hist, [[1, 0, 1, 0], [0, 2, 2, 0]])


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_ten_thousand_clients_fast(scheme: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 50_000)
    start = time.perf_counter()
    parts = partition(labels, 10_000, scheme, alpha=0.5)
    elapsed = time.perf_counter() - start
    assert_exact_cover(parts, 50_000, 10_000)
    assert elapsed < 2.0, f"{scheme} took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("num_clients", "scheme", "kwargs", "match"),
    [
        (10, "random", {}, "iid, dirichlet"),
        (1, "iid", {}, "between 2 and"),
        (10_001, "iid", {}, "between 2 and"),
        (2_001, "iid", {}, "lower num_clients"),
        (10, "dirichlet", {"alpha": 0.0}, "alpha"),
        (10, "dirichlet", {"alpha": -1.0}, "alpha"),
        (10, "pathological", {"classes_per_client": 0}, "classes_per_client"),
        (10, "pathological", {"classes_per_client": 11}, "classes_per_client"),
        (3, "pathological", {"classes_per_client": 2}, "at least 4"),
        (10, "shards", {"shards_per_client": 0}, "shards_per_client"),
        (1_000, "shards", {"shards_per_client": 3}, "shards_per_client"),
    ],
)
def test_bad_arguments(num_clients: int, scheme: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition(LABELS, num_clients, scheme, **kwargs)
