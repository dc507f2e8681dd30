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


# ---- label sets other than the fixed 12 ------------------------------------------------------

# The 35 words of Speech Commands v2 (Warden, 2018), in the data set's alphabetical folder order.
SPEECH_COMMANDS_V2: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go", "happy",
    "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop",
    "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)
LABEL_SETS_HELP = (
    "'keywords' (the 10 keywords + _unknown_ + _silence_), 'folder' (every word folder of the data), "
    "'speech-commands-35' (the 35 Speech Commands v2 words), or a comma-separated list "
    "(add _unknown_ / _silence_ to keep other words / silence as classes)"
)


def resolve_label_set(spec: str, folder_words: Sequence[str] = ()) -> tuple[str, ...]:
    """The label names for ``--labels``; ``folder_words`` are the data's word folders (for 'folder').

    Raises ValueError for an empty or duplicated list.
    """
    if spec in ("", "keywords"):
        labels: tuple[str, ...] = LABELS
    elif spec == "folder":
        words = {SILENCE if w == BACKGROUND_NOISE_DIR else w for w in folder_words}
        labels = tuple(sorted(words - {UNKNOWN, SILENCE})) + tuple(x for x in (UNKNOWN, SILENCE) if x in words)
    elif spec == "speech-commands-35":
        labels = SPEECH_COMMANDS_V2
    else:
        labels = tuple(x.strip() for x in spec.split(",") if x.strip())
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"label(s) {repeated} listed more than once in {spec!r}")
    if len(labels) < 2:
        raise ValueError(f"a label set needs >= 2 distinct names, got {list(labels)} from {spec!r}")
    return labels


def label_for(word: str, is_silence: bool, labels: Sequence[str]) -> str | None:
    """The class a clip of ``word`` belongs to under ``labels``, or None when the set has no place for it."""
    if is_silence or word in (SILENCE, BACKGROUND_NOISE_DIR):
        return SILENCE if SILENCE in labels else None
    if word in labels:
        return word
    return UNKNOWN if UNKNOWN in labels else None
