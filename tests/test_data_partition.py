"""Per-device partitions: invariants (hypothesis), skew versus alpha, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldfleet.common.data.partition import label_skew, partition_by_speaker, partition_dirichlet


def assert_disjoint_and_complete(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # every index exactly once


@st.composite
def speakers_and_devices(draw):
    speakers = draw(st.lists(st.integers(0, 30).map(lambda i: f"spk{i}"), min_size=1, max_size=200))
    devices = draw(st.integers(1, len(set(speakers))))
    return speakers, devices


@settings(max_examples=150, deadline=None)
@given(case=speakers_and_devices(), seed=st.integers(0, 2**32 - 1))
def test_speaker_partition_keeps_speakers_whole(case, seed):
    speakers, devices = case
    parts = partition_by_speaker(speakers, devices, seed)
    assert len(parts) == devices and all(parts)
    assert_disjoint_and_complete(parts, len(speakers))
    owner = {}
    for d, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(speakers[i], d) == d  # a speaker never spans two devices
    per_device = [len({speakers[i] for i in p}) for p in parts]
    assert max(per_device) - min(per_device) <= 1  # speakers dealt evenly
    assert partition_by_speaker(speakers, devices, seed) == parts


@st.composite
def labels_and_devices(draw):
    labels = draw(st.lists(st.integers(0, 11), min_size=1, max_size=300))
    min_size = draw(st.integers(0, min(3, len(labels))))
    devices = draw(st.integers(1, max(1, len(labels) // max(1, min_size))))
    return labels, devices, min_size


@settings(max_examples=150, deadline=None)
@given(case=labels_and_devices(), alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 10.0, 1000.0]), seed=st.integers(0, 2**32 - 1))
def test_dirichlet_partition_is_disjoint_complete_and_big_enough(case, alpha, seed):
    labels, devices, min_size = case
    parts = partition_dirichlet(labels, devices, alpha, seed, min_size=min_size)
    assert len(parts) == devices
    assert_disjoint_and_complete(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size
    assert partition_dirichlet(labels, devices, alpha, seed, min_size=min_size) == parts


def test_small_alpha_is_more_skewed_than_large_alpha():
    labels = np.repeat(np.arange(12), 100).tolist()
    skew = {a: np.mean([label_skew(labels, partition_dirichlet(labels, 10, a, s)) for s in range(5)]) for a in (0.05, 1.0, 100.0)}
    assert skew[0.05] > skew[1.0] > skew[100.0]
    assert skew[0.05] > 0.6 and skew[100.0] < 0.1  # near-disjoint classes vs near-IID


def test_tiny_alpha_with_many_devices_still_fills_every_device():
    labels = np.repeat(np.arange(3), 20).tolist()  # 3 classes, 20 devices: draws alone cannot fill them
    parts = partition_dirichlet(labels, 20, 0.001, seed=0, min_size=2)
    assert all(len(p) >= 2 for p in parts)
    assert_disjoint_and_complete(parts, len(labels))


def test_label_skew_bounds():
    labels = [0, 0, 1, 1]
    assert label_skew(labels, [[0, 2], [1, 3]]) == pytest.approx(0.0)  # each device mirrors the whole
    assert label_skew(labels, [[0, 1], [2, 3]]) == pytest.approx(0.5)  # each device one of two classes


def test_bad_partition_requests_fail_clearly():
    with pytest.raises(ValueError, match="only 2 speakers"):
        partition_by_speaker(["a", "b", "a"], 3, seed=0)
    with pytest.raises(ValueError, match="num_devices"):
        partition_by_speaker(["a"], 0, seed=0)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            partition_dirichlet([0, 1, 2], 2, alpha, seed=0)
    with pytest.raises(ValueError, match="cannot give 4 devices 1 each"):
        partition_dirichlet([0, 1, 2], 4, 1.0, seed=0)
