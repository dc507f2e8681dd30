"""Transcribed speech in the standard layouts: Hugging Face audiofolder and JSON-lines manifests.

* **audiofolder**: ``ROOT/metadata.csv`` with ``file_name,transcription[,speaker]`` (extra columns
  kept as per-utterance metadata; an optional ``split`` column with train/validation/test);
  ``file_name`` is relative to ROOT.
* **manifest**: one JSON object per line with ``audio_filepath`` (absolute, or relative to the
  manifest's folder), ``text`` and ``duration`` in seconds, as NeMo writes them; optional
  ``speaker`` and ``split``. ``--data`` may name the ``.json``/``.jsonl`` file, or a folder holding
  exactly one ``manifest.json[l]``.

Splits: a ``split`` column/field is used as given; otherwise whole speakers are assigned to
train/val/test (utterances without a speaker are their own speaker). Audio is read through
:func:`read_utterance` only, so a validating reader can replace it in one place.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio import read_audio
from .validate import BadClip
from .splits import DEFAULT_FRACTIONS, SPLITS, split_by_speaker

log = logging.getLogger("ldfleet.data")

METADATA = "metadata.csv"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


@dataclass(frozen=True)
class Utterance:
    """One transcribed recording on disk."""

    path: Path
    text: str
    speaker: str
    split: str | None = None  # train / val / test when the data set says so
    meta: dict[str, str] = field(default_factory=dict, compare=False)  # any other columns (conditions)


def read_utterance(path: str | Path) -> np.ndarray:
    """The one way an utterance's audio is read: 16 kHz mono float32, whole file, untrimmed."""
    return read_audio(path)


def _split_name(value: str | None, where: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {value!r} (train, validation or test)")
    return SPLIT_ALIASES[value.lower()]


def read_audiofolder(root: str | Path) -> list[Utterance]:
    """Utterances listed in ``ROOT/metadata.csv``; raises ValueError on missing columns or files."""
    root = Path(root)
    with open(root / METADATA, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file_name", "transcription"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{root / METADATA} lacks column(s) {sorted(missing)} (audiofolder: file_name,transcription[,speaker])")
        rows = list(reader)
    items = []
    for n, row in enumerate(rows, start=2):
        path = root / row["file_name"]
        if not path.is_file():
            raise ValueError(f"{root / METADATA} line {n}: no audio file {row['file_name']!r}")
        meta = {k: v for k, v in row.items() if k not in ("file_name", "transcription", "speaker", "split") and k}
        items.append(Utterance(path, row["transcription"] or "", row.get("speaker") or path.stem,
                               _split_name(row.get("split"), f"{root / METADATA} line {n}"), meta))
    return items


def read_manifest(manifest: str | Path) -> list[Utterance]:
    """Utterances of a JSON-lines manifest; raises ValueError on bad lines or missing files."""
    manifest = Path(manifest)
    items = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path = Path(entry["audio_filepath"])
            text = str(entry["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest} line {n}: expected JSON with audio_filepath and text ({exc})") from None
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            raise ValueError(f"{manifest} line {n}: no audio file {str(path)!r}")
        meta = {k: str(v) for k, v in entry.items() if k not in ("audio_filepath", "text", "speaker", "split")}
        items.append(Utterance(path, text, str(entry.get("speaker") or path.stem),
                               _split_name(entry.get("split"), f"{manifest} line {n}"), meta))
    return items


@dataclass(frozen=True)
class SpeechItem:
    """One loaded utterance, for code that works on clips rather than a Dataset (Whisper eval/training)."""

    waveform: np.ndarray  # float32 [samples] at 16 kHz
    text: str
    speaker: str
    file_name: str


def load_speech_items(data: str | Path, limit: int | None = None) -> list[SpeechItem]:
    """The utterances of an audiofolder or manifest in file order (the first ``limit`` when given),
    audio read by :func:`read_utterance`. Raises ValueError / FileNotFoundError as :func:`scan_transcribed`,
    :class:`~.validate.BadClip` for a clip that fails the checks."""
    items = scan_transcribed(data)
    return [SpeechItem(read_utterance(u.path), u.text, u.speaker, u.path.name) for u in items[: limit or None]]


def is_transcribed(data: str | Path) -> bool:
    """Whether ``data`` is an audiofolder or a manifest (rather than a Speech Commands folder)."""
    data = Path(data)
    if data.is_file():
        return data.suffix in (".json", ".jsonl")
    if (data / METADATA).is_file():
        with open(data / METADATA, newline="", encoding="utf-8") as f:
            return "transcription" in (csv.DictReader(f).fieldnames or ())
    return any((data / name).is_file() for name in MANIFEST_NAMES)


def scan_transcribed(data: str | Path) -> list[Utterance]:
    """All utterances of an audiofolder or manifest, in file order."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data {data} does not exist (make one with `ldfleet data synth --task asr --out {data}`)")
    if data.is_file():
        items = read_manifest(data)
    elif (data / METADATA).is_file():
        items = read_audiofolder(data)
    else:
        found = [data / name for name in MANIFEST_NAMES if (data / name).is_file()]
        if not found:
            raise ValueError(f"{data}: no {METADATA} (audiofolder) and no {' / '.join(MANIFEST_NAMES)} (manifest)")
        items = read_manifest(found[0])
    if not items:
        raise ValueError(f"{data} lists no utterances")
    return items


def assign_transcribed_splits(items: Sequence[Utterance], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """The given split of every item, or a speaker-disjoint split when the data set has none."""
    if all(u.split for u in items):
        return [u.split for u in items]  # type: ignore[misc]
    return split_by_speaker([u.speaker for u in items], fractions, seed)


class UtteranceDataset(Dataset):
    """``(waveform FloatTensor[samples], text)`` pairs of any length, with speakers and metadata kept."""

    def __init__(self, items: Sequence[Utterance], preload: bool = True):
        self.items = list(items)
        self.texts = [u.text for u in self.items]
        self.speakers = [u.speaker for u in self.items]
        self.waves = [torch.from_numpy(read_utterance(u.path)) for u in self.items] if preload else None

    @property
    def lengths(self) -> list[int] | None:
        """Samples of every utterance (for length-bucketed batches), when the audio is loaded."""
        return None if self.waves is None else [len(w) for w in self.waves]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        wave = self.waves[index] if self.waves is not None else torch.from_numpy(read_utterance(self.items[index].path))
        return wave, self.texts[index]

    def subset(self, indices: Sequence[int]) -> UtteranceDataset:
        sub = UtteranceDataset([], preload=False)
        sub.items = [self.items[i] for i in indices]
        sub.texts = [u.text for u in sub.items]
        sub.speakers = [u.speaker for u in sub.items]
        sub.waves = None if self.waves is None else [self.waves[i] for i in indices]
        return sub

    def conditions(self, key: str) -> list[str]:
        """One metadata column (e.g. ``snr_db``, ``channel``, ``voice``) for every utterance ('' if absent)."""
        return [u.meta.get(key, "") for u in self.items]


def load_transcribed_splits(
    data: str | Path, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, preload: bool = True, strict: bool = False
) -> dict[str, UtteranceDataset]:
    """``{"train", "val", "test"}`` datasets of an audiofolder or manifest.

    With ``preload`` every utterance is read once and checked (:mod:`.validate`): a bad file is
    skipped with its path and reason logged, or with ``strict`` raises :class:`~.validate.BadClip`.
    """
    items = scan_transcribed(data)
    waves = _read_all(items, strict) if preload else None
    if waves is not None:
        items = [u for u, w in zip(items, waves) if w is not None]
        waves = [w for w in waves if w is not None]
    names = assign_transcribed_splits(items, fractions, seed)
    splits = {}
    for split in SPLITS:
        rows = [i for i, n in enumerate(names) if n == split]
        ds = UtteranceDataset([items[i] for i in rows], preload=False)
        ds.waves = None if waves is None else [waves[i] for i in rows]
        splits[split] = ds
    return splits


def _read_all(items: Sequence[Utterance], strict: bool) -> list[torch.Tensor | None]:
    """Each utterance's waveform, or None where the file fails the checks (logged; ``strict`` raises)."""
    waves: list[torch.Tensor | None] = []
    for u in items:
        try:
            waves.append(torch.from_numpy(read_utterance(u.path)))
        except BadClip as exc:
            if strict:
                raise
            log.warning("skipped %s: %s", exc.path, exc.reason)
            waves.append(None)
    return waves
