"""A thin, explicit wrapper around the espeak-ng command line.

Every call passes all prosody arguments explicitly (no defaults read from the user's config), so
the same arguments always give the same samples: the corpus is reproducible from a seed.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess

import numpy as np
import soundfile as sf

ESPEAK = "espeak-ng"
INSTALL_HINT = "install it with `apt-get install espeak-ng`"

# English espeak-ng voices (the mb/* voices need MBROLA files and fail).
ENGLISH_VOICES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)

# Other languages reading English text: their letter-to-sound rules act as strong foreign accents.
ACCENT_VOICES: tuple[str, ...] = ("de", "es", "nl", "it")

# Variants that sound like distinct people and do not saturate at the amplitude we use. Left out:
# exact duplicates (caleb and klatt6 = klatt), variants that clip (ed, iven, Jacky, Marco, antonio, ...),
# and robotic/effect voices (robosoft*, Demonic, announcer, ...).
DEFAULT_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "adam", "Alex", "Alicia", "Andrea", "Annie", "aunty",
    "belinda", "benjamin", "boris", "croak", "david", "edward", "edward2", "grandma", "grandpa", "linda",
    "max", "Michael", "Mike", "norbert", "quincy", "rob", "robert", "shelby", "steph", "travis", "victor",
    "whisperf", "zac", "Denis", "Diogo", "Henrique", "Hugo", "Lee", "Mario", "Nguyen", "anika", "marcelo",
    "michel", "pablo",
)


class EspeakError(RuntimeError):
    """espeak-ng is missing, or refused a voice, or produced no audio."""


def espeak_binary(binary: str = ESPEAK) -> str:
    """Absolute path of espeak-ng, or a clear error that says how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise EspeakError(f"{binary} not found on PATH: {INSTALL_HINT}")
    return path


def _voice_table(binary: str, spec: str) -> list[list[str]]:
    out = subprocess.run([binary, f"--voices={spec}" if spec else "--voices"], capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]


@functools.cache
def available_variants(binary: str = ESPEAK) -> frozenset[str]:
    """Variant names espeak-ng accepts after ``+`` (the file names under ``!v/``).

    espeak-ng silently ignores an unknown variant, which would quietly merge two "speakers";
    checking names up front prevents that.
    """
    rows = _voice_table(espeak_binary(binary), "variant")
    return frozenset(row[4].split("/", 1)[1] for row in rows if len(row) >= 5 and row[4].startswith("!v/"))


@functools.cache
def available_voices(binary: str = ESPEAK) -> frozenset[str]:
    """Voice names espeak-ng accepts with ``-v`` (language codes and voice file paths), MBROLA excluded."""
    names: set[str] = set()
    for row in _voice_table(espeak_binary(binary), ""):
        if len(row) < 5 or row[4].startswith("mb/"):
            continue
        names.update((row[1], row[4], row[4].rsplit("/", 1)[-1]))
    return frozenset(names)


def check_speakers(voices: list[str], variants: list[str], binary: str = ESPEAK) -> None:
    """Fail early, with the offending names, on voices/variants espeak-ng does not have."""
    bad_voices = [v for v in voices if v.startswith("mb") or v not in available_voices(binary)]
    if bad_voices:
        raise EspeakError(f"unknown or unusable espeak-ng voices: {bad_voices} (see `espeak-ng --voices=en`)")
    bad_variants = [v for v in variants if v not in available_variants(binary)]
    if bad_variants:
        raise EspeakError(f"unknown espeak-ng variants: {bad_variants} (see `espeak-ng --voices=variant`)")


def synthesize(text: str, voice: str, speed: int, pitch: int, amplitude: int = 60, binary: str = ESPEAK) -> tuple[np.ndarray, int]:
    """Speak ``text``; returns float32 mono samples and their rate (22 050 Hz for espeak-ng).

    Uses ``--stdout``: its WAV header carries placeholder sizes, which libsndfile tolerates (it
    reads to the end of the data), so no temporary files are needed.
    """
    cmd = [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise EspeakError(f"espeak-ng failed for {voice!r} {text!r}: {reason[-1] if reason else f'exit {proc.returncode}'}")
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise EspeakError(f"espeak-ng produced no samples for {voice!r} {text!r}")
    return audio.mean(axis=1), int(sr)
