"""The record of one example on disk, shared by the scanner, the splitter and the dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .labels import LABEL_TO_ID, SILENCE


@dataclass(frozen=True)
class Clip:
    """One 1 s example on disk: a whole file, or a window of a background-noise recording."""

    rel: str  # path relative to the root (posix); windows get a "#k" suffix
    path: Path
    label: int
    speaker: str
    word: str  # the spoken word (folder name, or metadata's word column)
    start: int = 0  # first frame, in the file's own sample rate
    frames: int = -1  # -1: to the end of the file

    @property
    def is_silence(self) -> bool:
        return self.label == LABEL_TO_ID[SILENCE]
