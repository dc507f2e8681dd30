"""Transcribed speech in the standard layouts: Hugging Face audiofolder and JSON-lines manifests.

* **audiofolder**: ``ROOT/metadata.csv`` (UTF-8, with or without a byte-order mark) or
  ``ROOT/metadata.jsonl`` with ``file_name`` and the transcript in ``transcription`` (or ``text``, or
  ``sentence``), optionally ``speaker`` (extra columns kept as per-utterance metadata; an optional
  ``split`` column with train/validation/test); ``file_name`` is relative to ROOT (``/``, or Windows' backslashes).
  Hugging Face's per-split layout, ``ROOT/{train,validation,test}/metadata.csv``, gives the split by
  folder.
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
import io
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
    speaker_given: bool = field(default=True, compare=False)  # False: the data set names no speaker (speaker = file stem)


def read_utterance(path: str | Path) -> np.ndarray:
    """The one way an utterance's audio is read: 16 kHz mono float32, whole file, untrimmed."""
    return read_audio(path)


def _split_name(value: str | None, where: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_ALIASES:
        raise ValueError(f"{where}: unknown split {value!r} (train, validation or test)")
    return SPLIT_ALIASES[value.lower()]


#: Column names a transcript may have in an audiofolder, in order of preference.
TRANSCRIPT_COLUMNS = ("transcription", "text", "sentence")
METADATA_JSONL = "metadata.jsonl"


def _metadata_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``metadata.csv`` or ``metadata.jsonl`` as dicts of strings (blank rows dropped).
    Raises ValueError for a file that is not UTF-8 or a line that is not a JSON object."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"{path} line {n}: not JSON ({type(exc).__name__})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object")
            for key, value in row.items():
                if key in ("file_name", *TRANSCRIPT_COLUMNS) and not isinstance(value, str):
                    raise ValueError(f"{path} line {n}: {key} must be a string, got {json.dumps(value)[:80]}")
            rows.append({str(k): "" if v is None else str(v) for k, v in row.items()})
        return rows
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        if None in row:  # more fields than the header: a comma in an unquoted transcript, say
            raise ValueError(f"{path} line {reader.line_num}: {len(reader.fieldnames or ()) + len(row[None])} fields for "
                             f"{len(reader.fieldnames or ())} columns; quote a transcript that holds a comma (\"yes, stop\")")
        if any((v or "").strip() for v in row.values()):
            rows.append(row)
    return rows


def _read_text(path: Path) -> str:
    """A metadata file's or manifest's text: UTF-8 (a byte-order mark allowed, as Excel's "CSV UTF-8" writes), or
    UTF-16 with its byte-order mark (Excel's "Unicode text"). Raises ValueError for anything else."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                         "save it as UTF-8") from None


def _metadata_file(root: Path) -> Path | None:
    return next((root / name for name in (METADATA, METADATA_JSONL) if (root / name).is_file()), None)


def _transcript_column(path: Path, columns: Sequence[str]) -> str:
    if "file_name" in columns:
        for name in TRANSCRIPT_COLUMNS:
            if name in columns:
                return name
    missing = [c for c in ("file_name",) if c not in columns] + ([] if set(TRANSCRIPT_COLUMNS) & set(columns) else ["transcription"])
    raise ValueError(f"{path} lacks column(s) {missing} (audiofolder: file_name,transcription[,speaker]; the "
                     f"transcript may also be named {' or '.join(TRANSCRIPT_COLUMNS[1:])})")


def _audio_path(root: Path, name: str) -> Path | None:
    """``name`` under ``root``, also when written with Windows separators; None when no such file."""
    for candidate in (name, name.replace("\\", "/")):
        if candidate and (root / candidate).is_file():
            return root / candidate
    return None


def read_audiofolder(root: str | Path, split: str | None = None) -> list[Utterance]:
    """Utterances listed in ``ROOT/metadata.csv`` (or ``metadata.jsonl``), every one in ``split`` when
    given (Hugging Face's per-split folders); raises ValueError on missing columns or files."""
    root = Path(root)
    meta_path = _metadata_file(root)
    if meta_path is None:
        raise ValueError(f"{root}: no {METADATA} or {METADATA_JSONL}")
    rows = _metadata_rows(meta_path)
    columns = list(rows[0]) if rows else _header(meta_path)
    text_column = _transcript_column(meta_path, columns)
    items = []
    for n, row in enumerate(rows, start=2):
        name = (row.get("file_name") or "").strip()
        if not name:
            raise ValueError(f"{meta_path} row {n - 1}: empty file_name")
        path = _audio_path(root, name)
        if path is None:
            raise ValueError(f"{meta_path} row {n - 1}: no audio file {name!r} under {root}")
        meta = {k: v for k, v in row.items() if k not in ("file_name", text_column, "speaker", "split") and k}
        where = f"{meta_path} row {n - 1}"
        speaker = (row.get("speaker") or "").strip()
        items.append(Utterance(path, row.get(text_column) or "", speaker or path.stem,
                               split or _split_name(row.get("split"), where), meta, speaker_given=bool(speaker)))
    return items


def _header(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return []
    return next(csv.reader(io.StringIO(_read_text(path), newline="")), [])


def read_split_folders(root: str | Path) -> list[Utterance]:
    """Hugging Face's per-split audiofolder: ``ROOT/<split>/metadata.csv`` for train, validation
    (or val, dev, valid) and test, each split given by its folder."""
    root = Path(root)
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES and _metadata_file(p)):
        items += read_audiofolder(folder, split=SPLIT_ALIASES[folder.name.lower()])
    return items


def read_manifest(manifest: str | Path) -> list[Utterance]:
    """Utterances of a JSON-lines manifest; raises ValueError on bad lines or missing files."""
    manifest = Path(manifest)
    items = []
    for n, line in enumerate(_read_text(manifest).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path = Path(entry["audio_filepath"])
            text = entry["text"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest} line {n}: expected JSON with audio_filepath and text ({type(exc).__name__}: {exc})"[:300]) from None
        if not isinstance(text, str):
            raise ValueError(f"{manifest} line {n}: text must be a string, got {json.dumps(text)}")
        resolved = path if path.is_absolute() else manifest.parent / path
        if not resolved.is_file():
            hint = (f" (relative paths are read from the manifest's folder {manifest.parent}; {path} exists from the "
                    "current folder: write it relative to the manifest, or absolute)") if not path.is_absolute() and path.is_file() else ""
            raise ValueError(f"{manifest} line {n}: no audio file {str(resolved)!r}{hint}")
        meta = {k: str(v) for k, v in entry.items() if k not in ("audio_filepath", "text", "speaker", "split")}
        speaker = str(entry.get("speaker") or "").strip()
        items.append(Utterance(resolved, text, speaker or resolved.stem, _split_name(entry.get("split"), f"{manifest} line {n}"),
                               meta, speaker_given=bool(speaker)))
    return items


def corpus_warnings(items: Sequence[Utterance], splits: Sequence[str]) -> list[str]:
    """What in a transcribed corpus probably is not what its author meant: files listed twice, no
    speakers (splits then cannot keep speakers apart), one speaker in several splits (the test is
    not on unseen voices), empty transcripts. ``splits``: each item's split."""
    out = []
    seen: dict[Path, int] = {}
    for u in items:
        seen[u.path] = seen.get(u.path, 0) + 1
    repeated = [p for p, count in seen.items() if count > 1]
    if repeated:
        out.append(f"{len(repeated)} audio file(s) listed more than once (e.g. {repeated[0].name}): each copy is trained "
                   "or scored again")
    if items and not any(u.speaker_given for u in items) and not all(u.split for u in items):
        out.append("no speaker column: every utterance counts as its own speaker, so a speaker may be in train and "
                   "test; add a speaker column (or a split column) for a test on unseen voices")
    where: dict[str, set[str]] = {}
    for u, split in zip(items, splits):
        if u.speaker_given:
            where.setdefault(u.speaker, set()).add(split)
    shared = sorted(s for s, names in where.items() if "test" in names and len(names) > 1)
    if shared:
        out.append(f"{len(shared)} speaker(s) in test and another split (e.g. {shared[0]!r}): the test is not on unseen voices")
    given = sum(1 for u in items if u.split)
    if 0 < given < len(items):
        out.append(f"the split column is empty on {len(items) - given} of {len(items)} rows, so it is not used: whole "
                   "speakers are drawn into train/val/test instead; fill it on every row to keep your splits")
    empty = sum(1 for u in items if not u.text.strip())
    if empty:
        out.append(f"{empty} utterance(s) with an empty transcript (trained as silence)")
    return out


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
    """Whether ``data`` is an audiofolder (also per split folders) or a manifest, rather than a
    Speech Commands folder."""
    data = Path(data)
    if data.is_file():
        return data.suffix in (".json", ".jsonl")
    if not data.is_dir():
        return False
    if any((data / name).is_file() for name in (METADATA_JSONL, *MANIFEST_NAMES)):
        return True
    if (data / METADATA).is_file():
        try:
            columns = _header(data / METADATA)
        except ValueError:
            return True  # read as an audiofolder, which says what is wrong with the file
        return bool(set(TRANSCRIPT_COLUMNS) & set(columns))  # without file_name too: the reader says it lacks it
    return any(p.is_dir() and p.name.lower() in SPLIT_ALIASES and _metadata_file(p) for p in data.iterdir())


def scan_transcribed(data: str | Path) -> list[Utterance]:
    """All utterances of an audiofolder or manifest, in file order."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data {data} does not exist (make one with `ldfleet data synth --task asr --out {data}`)")
    if data.is_file():
        items = read_manifest(data)
    elif _metadata_file(data):
        items = read_audiofolder(data)
    elif found := [data / name for name in MANIFEST_NAMES if (data / name).is_file()]:
        items = read_manifest(found[0])
    else:
        items = read_split_folders(data)
        if not items:
            raise ValueError(f"{data}: no {METADATA} or {METADATA_JSONL} (audiofolder), no {' / '.join(MANIFEST_NAMES)} "
                             "(manifest) and no train/validation/test folders holding one")
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

    @staticmethod
    def join(parts: Sequence[UtteranceDataset]) -> UtteranceDataset:
        """One dataset of every utterance of ``parts``, in order (e.g. all splits of a test corpus)."""
        out = UtteranceDataset([u for part in parts for u in part.items], preload=False)
        out.waves = [w for part in parts for w in part.waves] if all(part.waves is not None for part in parts) else None  # type: ignore[union-attr]
        return out

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
    for warning in corpus_warnings(items, names):
        log.warning("%s: %s", data, warning)
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
