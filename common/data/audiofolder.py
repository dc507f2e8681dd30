"""Read a Hugging Face audiofolder: ``metadata.csv`` (``file_name,transcription[,speaker]``) + audio.

Items are ``(waveform float32 [samples] at 16 kHz mono, text, speaker)``; other sample rates are
resampled (polyphase), stereo is averaged. A missing column, a missing file or an unreadable clip
raises ``ValueError`` naming the row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

METADATA = "metadata.csv"
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SpeechItem:
    waveform: np.ndarray  # float32 [samples] at 16 kHz
    text: str
    speaker: str
    file_name: str


def is_audiofolder(root: str | Path) -> bool:
    return (Path(root) / METADATA).is_file()


def read_audio(path: Path) -> np.ndarray:
    """A clip as float32 mono at 16 kHz."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = np.gcd(sr, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return audio


def load_audiofolder(root: str | Path, limit: int | None = None) -> list[SpeechItem]:
    """Every row of ``root/metadata.csv`` (the first ``limit`` rows when given), audio loaded."""
    root = Path(root)
    meta = root / METADATA
    if not meta.is_file():
        raise ValueError(f"{root} is not an audiofolder: no {METADATA}")
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not {"file_name", "transcription"} <= cols:
            raise ValueError(f"{meta} needs columns file_name,transcription[,speaker]; has {sorted(cols)}")
        rows = list(reader)
    items = []
    for n, row in enumerate(rows[:limit] if limit else rows, start=2):
        path = root / row["file_name"]
        try:
            audio = read_audio(path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{meta} line {n}: cannot read {path}: {exc}") from exc
        items.append(SpeechItem(audio, row["transcription"], row.get("speaker") or "unknown", row["file_name"]))
    return items
