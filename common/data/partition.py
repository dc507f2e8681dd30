"""Dividing a training set among simulated devices for federated learning.

Real fleets are non-IID: a phone hears its owner (few speakers) and its owner's habits (some
words far more than others). ``partition_by_speaker`` models the first, ``partition_dirichlet``
the second, with ``alpha`` as the knob (small alpha: each device sees few classes).
Both return disjoint lists of indices that together cover every example exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_DIRICHLET_DRAWS = 100


def _check_devices(num_devices: int) -> None:
    if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")


def partition_by_speaker(speakers: Sequence[str], num_devices: int, seed: int) -> list[list[int]]:
    """Give every device whole speakers: shuffle the distinct speakers, deal them in contiguous runs.

    Each device gets ``n_speakers // num_devices`` or one more speakers, so no device is empty;
    how many clips it gets depends on its speakers (quantity skew, as in a real fleet).
    """
    _check_devices(num_devices)
    distinct = sorted(set(speakers))
    if num_devices > len(distinct):
        raise ValueError(f"cannot give {num_devices} devices whole speakers: only {len(distinct)} speakers")
    order = np.random.default_rng(seed).permutation(len(distinct))
    device_of = {}
    for device, chunk in enumerate(np.array_split(order, num_devices)):
        device_of.update((distinct[i], device) for i in chunk)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for index, speaker in enumerate(speakers):
        parts[device_of[speaker]].append(index)
    return parts


def _dirichlet_draw(by_class: list[np.ndarray], num_devices: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for members in by_class:
        members = rng.permutation(members)
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(chunk.tolist())
    return parts


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random examples from the largest devices to those below ``min_size`` (keeps the skew elsewhere)."""
    for small in range(len(parts)):
        while len(parts[small]) < min_size:
            donor = max(range(len(parts)), key=lambda d: len(parts[d]))
            parts[small].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))


def partition_dirichlet(labels: Sequence[int], num_devices: int, alpha: float, seed: int, min_size: int = 1) -> list[list[int]]:
    """Per class, split its examples over devices by proportions drawn from Dirichlet(alpha).

    Draws are repeated until every device has ``min_size`` examples; with a tiny alpha and many
    devices that may never happen (a class lands on one device), so after
    ``MAX_DIRICHLET_DRAWS`` tries the last draw is topped up from the largest devices.
    """
    _check_devices(num_devices)
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_devices * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_devices} devices {min_size} each")
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    by_class = [np.flatnonzero(label_array == c) for c in np.unique(label_array)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(by_class, num_devices, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _top_up(parts, min_size, rng)
    return [sorted(p) for p in parts]


def label_skew(labels: Sequence[int], parts: Sequence[Sequence[int]]) -> float:
    """Mean total-variation distance between each device's label mix and the global one.

    0 means every device sees the global class balance (IID); values near 1 mean devices see
    disjoint classes. Example-weighted, so near-empty devices do not dominate.
    """
    label_array = np.asarray(labels)
    classes = np.unique(label_array)
    total = np.array([(label_array == c).sum() for c in classes], dtype=float)
    global_mix = total / total.sum()
    skew, weight = 0.0, 0
    for part in parts:
        if len(part) == 0:
            continue
        local = label_array[np.asarray(part, dtype=int)]
        mix = np.array([(local == c).sum() for c in classes], dtype=float) / len(local)
        skew += 0.5 * np.abs(mix - global_mix).sum() * len(local)
        weight += len(local)
    return skew / weight if weight else 0.0
