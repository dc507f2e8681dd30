"""The 12-class keyword-spotting label set shared by the corpus, the loader and the model head.

The order is the class id: the model's output unit ``i`` means ``LABELS[i]`` everywhere, so this
tuple must only ever grow at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
LABELS: tuple[str, ...] = KEYWORDS + (UNKNOWN, SILENCE)
NUM_CLASSES = len(LABELS)

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # one second: the Speech Commands clip length

# The other Speech Commands (v1) words: spoken, but the model must call them _unknown_.
UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
    "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
)

# Real Speech Commands keeps long noise recordings here; 1 s windows of them become _silence_.
BACKGROUND_NOISE_DIR = "_background_noise_"

LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}


def label_id(word: str) -> int:
    """Class id for a folder/word name: keywords are themselves, silence is silence, the rest unknown."""
    if word in KEYWORDS:
        return LABEL_TO_ID[word]
    if word in (SILENCE, BACKGROUND_NOISE_DIR):
        return LABEL_TO_ID[SILENCE]
    return LABEL_TO_ID[UNKNOWN]


def label_counts(labels: Sequence[int]) -> dict[str, int]:
    """Clips per class name, in class-id order (zeros included, so tables line up)."""
    counts = Counter(labels)
    return {name: counts.get(i, 0) for i, name in enumerate(LABELS)}
