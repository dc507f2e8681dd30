"""Read any folder in Google Speech Commands layout: real Speech Commands or our synthetic corpus.

Layout: ``ROOT/<word>/<speaker>_nohash_<n>.wav``. The 10 keywords are their own classes,
``_silence_`` is silence, 1 s windows of ``ROOT/_background_noise_/*.wav`` are silence too, and
every other word folder is ``_unknown_``. Scanning reads only file headers; audio is loaded by
:class:`~.dataset.ClipDataset`.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from .clip import Clip
from .dataset import ClipDataset
from .labels import BACKGROUND_NOISE_DIR, LABEL_TO_ID, SILENCE, label_counts, label_id
from .splits import SPLITS, assign_splits, read_split_lists

METADATA = "metadata.csv"
NOHASH = "_nohash_"
BACKGROUND_WINDOWS_PER_SPEAKER = 10  # 10 s of one noise recording = one pseudo-speaker for splitting


def speaker_from_filename(name: str) -> str:
    """Speech Commands convention ``<speaker>_nohash_<n>.wav``; other names are their own speaker."""
    stem = Path(name).stem
    return stem.split(NOHASH, 1)[0] if NOHASH in stem else stem


def _metadata(root: Path) -> dict[str, dict[str, str]]:
    """Rows of ``metadata.csv`` by relative path (our corpus has one; real Speech Commands does not)."""
    meta = root / METADATA
    if not meta.is_file():
        return {}
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            return {}
        return {row["path"]: row for row in reader}


def _wavs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".wav")


def _background_windows(root: Path) -> list[Clip]:
    clips = []
    folder = root / BACKGROUND_NOISE_DIR
    for path in _wavs(folder) if folder.is_dir() else []:
        info = sf.info(str(path))
        window = int(info.samplerate)  # 1 s
        for k in range(info.frames // window):
            clips.append(Clip(
                rel=f"{BACKGROUND_NOISE_DIR}/{path.name}#{k}", path=path, label=LABEL_TO_ID[SILENCE],
                speaker=f"bg-{path.stem}-{k // BACKGROUND_WINDOWS_PER_SPEAKER}", word=BACKGROUND_NOISE_DIR,
                start=k * window, frames=window,
            ))
    return clips


def scan_folder(root: str | Path) -> list[Clip]:
    """All clips under ``root`` in a deterministic order (folders and files sorted)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist (make one with `ldfleet data synth --out {root}`)")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} is not a directory")
    meta = _metadata(root)
    clips: list[Clip] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name == BACKGROUND_NOISE_DIR:
            continue
        for path in _wavs(folder):
            rel = f"{folder.name}/{path.name}"
            row = meta.get(rel, {})
            speaker = row.get("speaker") or speaker_from_filename(path.name)
            word = row.get("word") or folder.name  # our _unknown_ folder holds many words
            clips.append(Clip(rel=rel, path=path, label=label_id(folder.name), speaker=speaker, word=word))
    clips.extend(_background_windows(root))
    if not clips:
        raise ValueError(f"no .wav clips under {root}: expected <word>/<speaker>_nohash_<n>.wav (Speech Commands layout)")
    return clips


def load_splits(
    root: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    preload: bool = True,
) -> dict[str, ClipDataset]:
    """``{"train", "val", "test"}`` datasets for a Speech Commands-layout folder, speaker-disjoint."""
    clips = scan_folder(root)
    names = assign_splits(clips, root, fractions, seed)
    return {split: ClipDataset([c for c, n in zip(clips, names) if n == split], preload=preload) for split in SPLITS}


@dataclass
class FolderStats:
    """What ``ldfleet data info`` shows: clips per split and label, and speakers per split."""

    counts: dict[str, dict[str, int]]  # split -> label -> clips
    speakers: dict[str, int]  # split -> distinct speakers
    words: dict[str, int]  # spoken word (or folder) -> clips: shows what _unknown_ is made of
    official_lists: bool  # validation_list.txt / testing_list.txt were used


def describe(root: str | Path, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> FolderStats:
    """Split statistics from file headers alone (no audio is decoded)."""
    clips = scan_folder(root)
    names = assign_splits(clips, root, fractions, seed)
    return FolderStats(
        counts={s: label_counts([c.label for c, n in zip(clips, names) if n == s]) for s in SPLITS},
        speakers={s: len({c.speaker for c, n in zip(clips, names) if n == s}) for s in SPLITS},
        words=dict(sorted(Counter(c.word for c in clips).items())),
        official_lists=read_split_lists(root) is not None,
    )
