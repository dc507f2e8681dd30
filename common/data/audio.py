"""Clip-level audio handling: every clip, synthetic or real, ends up as 1 s of 16 kHz mono float32.

The model and the federated clients only ever see fixed-length clips, so all reading goes through
:func:`load_clip`, and both the synthesizer and the folder loader apply the same trim/centre rules.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from .labels import CLIP_SAMPLES, SAMPLE_RATE
from .validate import read_checked

NOISE_COLOURS = ("white", "pink", "brown")


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a ``[frames, channels]`` (or 1-D) array into float32 mono."""
    audio = np.asarray(audio, dtype=np.float32)
    return audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling by the reduced ratio (22 050 -> 16 000 Hz is up 320, down 441)."""
    if sr_in == sr_out:
        return np.asarray(audio, dtype=np.float32)
    g = math.gcd(int(sr_in), int(sr_out))
    return resample_poly(audio, sr_out // g, sr_in // g).astype(np.float32)


def read_audio(path: str | Path, start: int = 0, frames: int = -1) -> np.ndarray:
    """Read any WAV soundfile understands (any rate, any channel count) as 16 kHz mono float32.

    ``start``/``frames`` are in the file's own sample rate, so that 1 s windows of a long
    background-noise recording can be read without loading it whole. Raises
    :class:`~.validate.BadClip` (naming the file) for undecodable, empty or non-finite audio.
    """
    data, sr = read_checked(path, start=start, frames=frames)
    return resample(to_mono(data), sr)


def frame_rms(audio: np.ndarray, frame: int = 160) -> np.ndarray:
    """RMS of consecutive non-overlapping frames (10 ms at 16 kHz); a short tail is its own frame."""
    n = len(audio)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    pad = (-n) % frame
    frames = np.pad(audio, (0, pad)).reshape(-1, frame).astype(np.float64)
    return np.sqrt((frames**2).mean(axis=1))


def trim_silence(audio: np.ndarray, top_db: float = 45.0, frame: int = 160, margin: int = 2) -> np.ndarray:
    """Cut leading/trailing frames quieter than ``top_db`` below the loudest frame.

    espeak-ng pads words with silence (about 10% of clips run past 1 s because of it); trimming
    first lets us centre the word itself. A relative threshold works at any recording level.
    ``margin`` frames are kept on each side so soft onsets and fricative tails survive.
    """
    energy = frame_rms(audio, frame)
    if energy.size == 0 or not energy.max() > 0.0:  # silent, or NaN (read_audio refuses those)
        return audio
    loud = np.flatnonzero(energy >= energy.max() * 10.0 ** (-top_db / 20.0))
    first = max(0, loud[0] - margin) * frame
    last = min(len(energy), loud[-1] + 1 + margin) * frame
    return audio[first:last]


def fix_length(audio: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Centre the audio in exactly ``length`` samples: zero-pad both sides or cut both ends."""
    n = len(audio)
    if n >= length:
        start = (n - length) // 2
        return np.ascontiguousarray(audio[start : start + length], dtype=np.float32)
    left = (length - n) // 2
    return np.pad(audio, (left, length - n - left)).astype(np.float32)


def load_clip(path: str | Path, trim: bool = True, start: int = 0, frames: int = -1) -> np.ndarray:
    """Read, resample, optionally trim and centre: the one way a clip enters the model (16 000 samples)."""
    audio = read_audio(path, start=start, frames=frames)
    return fix_length(trim_silence(audio) if trim else audio)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM (the Speech Commands format); out-of-range samples are clipped, not wrapped."""
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0


def db_to_amplitude(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def coloured_noise(colour: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power) noise, shaped in the frequency domain."""
    if colour not in NOISE_COLOURS:
        raise ValueError(f"noise colour must be one of {NOISE_COLOURS}, got {colour!r}")
    white = rng.standard_normal(n)
    if colour != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1] if n > 1 else 1.0  # no infinite gain at DC
        exponent = 0.5 if colour == "pink" else 1.0  # amplitude ~ f^-exponent
        white = np.fft.irfft(spectrum / freqs**exponent, n)
    white -= white.mean()
    level = rms(white)
    return (white / level if level > 0 else white).astype(np.float32)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float, signal_power: float | None = None) -> np.ndarray:
    """Add ``noise`` scaled so that signal power / noise power is ``snr_db``.

    ``signal_power`` defaults to the mean power of ``clean``; pass the power of the speech alone
    when ``clean`` is padded with silence, so the SNR describes the word, not the padding.
    """
    if len(noise) != len(clean):
        raise ValueError(f"noise has {len(noise)} samples, clean has {len(clean)}")
    p_signal = float(np.mean(np.square(clean, dtype=np.float64))) if signal_power is None else signal_power
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_noise == 0.0 or p_signal == 0.0:
        return np.asarray(clean, dtype=np.float32).copy()
    scale = math.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (clean + scale * noise).astype(np.float32)
