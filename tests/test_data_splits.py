"""Speaker-disjoint splits: invariants over arbitrary speaker lists (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldfleet.common.data.splits import SPLITS, check_fractions, split_by_speaker

speaker_lists = st.lists(st.sampled_from([f"s{i}" for i in range(40)]), min_size=1, max_size=300)
fraction_sets = st.sampled_from([(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)])


@settings(max_examples=150, deadline=None)
@given(speakers=speaker_lists, fractions=fraction_sets, seed=st.integers(0, 2**32 - 1))
def test_no_speaker_in_two_splits_and_every_clip_assigned(speakers, fractions, seed):
    names = split_by_speaker(speakers, fractions, seed)
    assert len(names) == len(speakers) and set(names) <= set(SPLITS)
    split_of: dict[str, str] = {}
    for spk, name in zip(speakers, names):
        assert split_of.setdefault(spk, name) == name
    n = len(split_of)
    wanted = [s for s, f in zip(SPLITS, fractions) if f > 0]
    if n >= len(wanted):  # enough speakers: every split with a share gets one
        assert set(split_of.values()) == set(wanted)
    for s, f in zip(SPLITS, fractions):  # speaker counts follow the fractions (+-1, +1 for the minimum)
        assert abs(sum(v == s for v in split_of.values()) - f * n) <= 2
    assert split_by_speaker(speakers, fractions, seed) == names


@settings(max_examples=60, deadline=None)
@given(n_speech=st.integers(3, 30), n_noise=st.integers(3, 12), seed=st.integers(0, 10_000))
def test_strata_are_split_separately(n_speech, n_noise, seed):
    speakers = [f"v{i}" for i in range(n_speech)] + [f"noise-{i}" for i in range(n_noise)]
    strata = ["speech"] * n_speech + ["silence"] * n_noise
    names = split_by_speaker(speakers, (0.6, 0.2, 0.2), seed, strata=strata)
    for kind in ("speech", "silence"):  # each split gets speech speakers AND noise pseudo-speakers
        assert {n for n, k in zip(names, strata) if k == kind} == set(SPLITS)


def test_other_seed_gives_another_split():
    speakers = [f"s{i}" for i in range(50)]
    assert split_by_speaker(speakers, seed=0) != split_by_speaker(speakers, seed=1)


@pytest.mark.parametrize("bad", [(0.8, 0.1), (0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)])
def test_bad_fractions_are_rejected(bad):
    with pytest.raises(ValueError, match="fractions"):
        check_fractions(bad)


def test_split_counts_are_what_split_by_speaker_gives():
    from collections import Counter

    from ldfleet.common.data.splits import split_counts

    for n in range(1, 24):
        got = Counter(split_by_speaker([f"s{i}" for i in range(n)], seed=n))
        assert [got.get(name, 0) for name in ("train", "val", "test")] == split_counts(n), n
    assert split_counts(15) == [12, 2, 1]  # a scenario's count of training speakers relies on this
