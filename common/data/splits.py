"""Train/val/test splits that hold out whole speakers.

A keyword model that has heard a speaker in training looks better on that speaker than it will
on a new device's owner, so no speaker may sit in two splits. Real Speech Commands ships its own
speaker-disjoint lists (``validation_list.txt``, ``testing_list.txt``); they are used when present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .clip import Clip
from .labels import BACKGROUND_NOISE_DIR

SPLITS = ("train", "val", "test")
#: The default shares of speakers per split (train, val, test).
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
LIST_FILES = {"val": "validation_list.txt", "test": "testing_list.txt"}


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    f = tuple(float(x) for x in fractions)
    if not all(math.isfinite(x) and x >= 0 for x in f) or not math.isclose(sum(f), 1.0, abs_tol=1e-6) or f[0] <= 0:
        raise ValueError(f"fractions must be >= 0, sum to 1 and give train a share, got {f}")
    return f  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """How many of ``n`` speakers each split gets: largest-remainder counts, then every split with
    a share gets at least one, when ``n`` allows (what ``split_by_speaker`` gives each stratum)."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_by_speaker(
    speakers: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    strata: Sequence[str] | None = None,
) -> list[str]:
    """The split name of every item, assigning whole speakers by ``fractions`` of the speakers.

    Speakers are shuffled with ``seed`` within each stratum (e.g. speech speakers vs. noise
    pseudo-speakers) and each stratum is divided separately, so every split gets some of each.
    """
    fractions = check_fractions(fractions)
    if strata is not None and len(strata) != len(speakers):
        raise ValueError("strata must give one stratum per item")
    kinds: dict[str, set[str]] = {}
    for i, spk in enumerate(speakers):
        kinds.setdefault(spk, set()).add(strata[i] if strata is not None else "")
    groups: dict[str, list[str]] = {}
    for spk, ks in kinds.items():
        groups.setdefault("|".join(sorted(ks)), []).append(spk)
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for key in sorted(groups):
        members = sorted(groups[key])
        order = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, count in zip(SPLITS, split_counts(len(order), fractions)):
            split_of.update((spk, name) for spk in order[start : start + count])
            start += count
    return [split_of[spk] for spk in speakers]


def list_files(root: str | Path) -> dict[str, Path]:
    """``{"val": path, "test": path}`` for the Speech Commands list files present in ``root``."""
    root = Path(root)
    return {split: root / name for split, name in LIST_FILES.items() if (root / name).is_file()}


def assign_splits(
    clips: Sequence[Clip],
    listed: dict[str, str] | None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """Split names for scanned clips: from ``listed`` (clip rel -> split) if given, else by speaker.

    With lists, unlisted clips are training clips (the Speech Commands rule) and background-noise
    windows, which no list mentions, are divided by pseudo-speaker like everything else would be.
    """
    if listed is None:
        return split_by_speaker([c.speaker for c in clips], fractions, seed, strata=[str(c.is_silence) for c in clips])
    result = [listed.get(c.rel, "train") for c in clips]
    windows = [i for i, c in enumerate(clips) if c.word == BACKGROUND_NOISE_DIR]
    if windows:
        for i, name in zip(windows, split_by_speaker([clips[i].speaker for i in windows], fractions, seed)):
            result[i] = name
    return result
