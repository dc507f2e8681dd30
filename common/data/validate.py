"""Check every audio file before it becomes a clip: one place, shared by every folder or manifest loader.

A clip must decode, hold at least one frame, have a plausible sample rate and hold only finite
samples. :func:`read_checked` reads a file (or a window of it) and raises :class:`BadClip` with a
plain reason otherwise; loaders record the failure as :class:`Skipped` (path, reason) and go on,
or stop when the user asked for ``--strict``. :func:`is_candidate` says which directory entries
can be clips at all: hidden files (``.DS_Store``, macOS AppleDouble ``._name.wav``) and files that
are not audio never are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# What soundfile decodes: libsndfile 1.1 and later also reads MP3.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg") + ((".mp3",) if "MP3" in sf.available_formats() else ())
# Folders that hold no clips even though they look like word folders: macOS zip resource forks.
NOT_CLIP_DIRS = ("__MACOSX",)
MIN_SAMPLE_RATE = 8_000  # telephone speech; below this no speech model input makes sense
MAX_SAMPLE_RATE = 192_000  # the highest rate studio recorders write


@dataclass(frozen=True)
class Skipped:
    """A file (or ``path#k`` window) left out of the data, and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class BadClip(ValueError):
    """An audio file that cannot be a clip. ``str()`` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def skipped(self) -> Skipped:
        return Skipped(self.path, self.reason)


def is_hidden(path: str | Path) -> bool:
    """Dot files: ``.DS_Store``, AppleDouble ``._x.wav``, editor swap files."""
    return Path(path).name.startswith(".")


def is_candidate(path: Path) -> bool:
    """Whether a directory entry may be a clip: a visible regular file with an audio suffix."""
    return path.is_file() and not is_hidden(path) and path.suffix.lower() in AUDIO_SUFFIXES


def is_clip_dir(path: Path) -> bool:
    """Whether a sub-folder may hold clips (not hidden, not a macOS ``__MACOSX`` fork folder)."""
    return path.is_dir() and not is_hidden(path) and path.name not in NOT_CLIP_DIRS


def check_info(path: str | Path) -> sf._SoundFileInfo:
    """The file's header if it decodes and has frames at a plausible rate; else :class:`BadClip`."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise BadClip(path, f"not decodable audio ({_short(exc)})") from None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise BadClip(path, f"implausible sample rate {info.samplerate} Hz "
                            f"(expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if info.frames <= 0:
        raise BadClip(path, "empty: the header is valid but the file holds 0 audio frames")
    return info


def check_samples(path: str | Path, data: np.ndarray) -> np.ndarray:
    """``data`` unchanged if it has samples and all are finite; else :class:`BadClip`."""
    if data.size == 0:
        raise BadClip(path, "empty: 0 audio frames")
    finite = np.isfinite(data)
    if not finite.all():
        first = int(np.flatnonzero(~finite.reshape(len(data), -1).all(axis=1))[0])
        raise BadClip(path, f"non-finite samples (NaN/Inf), {int((~finite).sum())} of them, first at frame {first}")
    return data


def read_frames(path: str | Path, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """``([frames, channels] float32, sample rate)`` after the header check; samples not yet checked."""
    info = check_info(path)
    try:
        data, sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise BadClip(path, f"not decodable audio ({_short(exc)})") from None
    return data, int(sr or info.samplerate)


def read_checked(path: str | Path, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """``([frames, channels] float32, sample rate)`` of a checked file or window; :class:`BadClip` if bad."""
    data, sr = read_frames(path, start, frames)
    return check_samples(path, data), sr


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
