"""Real bad audio files as they turn up in the field, written with soundfile / wave / raw bytes."""

from __future__ import annotations

import wave

import numpy as np
import soundfile as sf

TONE = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)).astype(np.float32)


def nan_wav(path, value=np.nan):
    bad = TONE.copy()
    bad[100:110] = value
    sf.write(path, bad, 16000, subtype="FLOAT")
    return path


def zero_frame_wav(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    return path


def appledouble(path):
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 200)
    return path


def wrong_rate_wav(path, rate=100):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((TONE * 32767).astype("<i2").tobytes())
    return path
