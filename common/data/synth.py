"""A keyword corpus spoken by espeak-ng, written in Google Speech Commands layout.

No speech data set can be downloaded here, so the fleet trains on synthetic speech: the 10
keywords, other Speech Commands words as ``_unknown_``, and background noise as ``_silence_``.
A *speaker* is an espeak-ng voice (accent) plus a variant (timbre), with its own base pitch and
speed; clips vary around them. Speakers are what the splits hold out and what devices own.

Everything random is drawn up front, in plan order, from one seeded generator, and every clip
is rendered from its own plan entry, so the corpus is byte-identical for a seed whatever the
number of workers or the order in which clips finish.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.progress import track

from . import audio as A
from .espeak import DEFAULT_VARIANTS, ENGLISH_VOICES, ESPEAK, check_speakers, espeak_binary, synthesize
from .labels import CLIP_SAMPLES, KEYWORDS, LABELS, SILENCE, UNKNOWN, UNKNOWN_WORDS

METADATA = "metadata.csv"
METADATA_COLUMNS = ("path", "label", "speaker", "voice", "variant", "speed", "pitch", "word", "level_dbfs", "snr_db")

ESPEAK_AMPLITUDE = 60  # headroom: louder variants saturate inside espeak-ng at its default of 100
SPEED_RANGE = (120, 200)  # words per minute
PITCH_RANGE = (20, 80)  # espeak-ng 0..99
SPEECH_PEAK_DBFS = (-16.0, -1.0)  # per-clip loudness of the word
SNR_SPAN_DB = 20.0  # clip SNR is uniform in [snr_db, snr_db + SNR_SPAN_DB]
SILENCE_NOISE_DBFS = (-70.0, -48.0)  # RMS of coloured-noise silence clips
NEAR_SILENCE_DBFS = (-90.0, -72.0)  # RMS of "room tone" silence clips
MAX_NOISE_SPEAKERS = 16
T = TypeVar("T")
R = TypeVar("R")  # _silence_ clips are spread over this many pseudo-speakers


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize. The defaults give ~3 000 clips from 64 speakers, 256 per class."""

    out: Path
    seed: int = 0
    voices: tuple[str, ...] = ENGLISH_VOICES
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # pool each voice draws its variants from
    variants_per_voice: int = 8
    clips_per_word: int = 4  # per speaker and keyword
    unknown_words: tuple[str, ...] = UNKNOWN_WORDS
    unknown_per_speaker: int = 4
    silence_clips: int = 256
    noise: bool = True  # background noise under speech clips
    snr_db: float = 15.0  # lowest SNR when noise is on
    workers: int | None = None  # default: number of CPU cores
    overwrite: bool = False
    espeak: str = ESPEAK


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip, so rendering needs no shared random state."""

    path: str  # relative to the corpus root, posix
    label: str
    speaker: str
    voice: str
    variant: str
    word: str
    speed: int | None
    pitch: int | None
    level_dbfs: float  # speech: peak level; silence: RMS level
    snr_db: float | None
    noise_colour: str  # white/pink/brown, or "quiet" for near-silence
    noise_seed: int

    def row(self) -> dict[str, str]:
        def fmt(v: object) -> str:
            return "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

        return {c: fmt(getattr(self, c)) for c in METADATA_COLUMNS}


@dataclass
class SynthSummary:
    out: Path
    counts: dict[str, int]
    speakers: int  # espeak-ng speakers (voice+variant)
    noise_speakers: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def clips(self) -> int:
        return sum(self.counts.values())


def file_stem(speaker: str) -> str:
    """Speaker id as a filename part: ``en-us+f3`` -> ``en-us_f3`` (metadata.csv keeps the real id)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", speaker.replace("+", "_"))


def _speakers(cfg: SynthConfig, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(voice, variant) pairs: each voice draws its own variants, so speakers never repeat."""
    voices, pool = tuple(dict.fromkeys(cfg.voices)), tuple(dict.fromkeys(cfg.variants))
    if not voices or cfg.variants_per_voice < 1:
        raise ValueError("need at least one voice and variants_per_voice >= 1")
    if cfg.variants_per_voice > len(pool):
        raise ValueError(f"variants_per_voice={cfg.variants_per_voice} but only {len(pool)} variants to draw from")
    return [(voice, pool[int(i)]) for voice in voices for i in rng.choice(len(pool), size=cfg.variants_per_voice, replace=False)]


def plan(cfg: SynthConfig) -> list[ClipSpec]:
    """The full, ordered list of clips for a config; pure function of the config."""
    if cfg.clips_per_word < 0 or cfg.unknown_per_speaker < 0 or cfg.silence_clips < 0:
        raise ValueError("clip counts must be >= 0")
    if cfg.unknown_per_speaker and not cfg.unknown_words:
        raise ValueError("unknown_per_speaker > 0 needs at least one unknown word")
    clash = sorted(set(cfg.unknown_words) & set(KEYWORDS))
    if clash:
        raise ValueError(f"unknown words must not be keywords: {clash}")
    rng = np.random.default_rng(cfg.seed)
    specs: list[ClipSpec] = []
    counters: Counter[tuple[str, str]] = Counter()

    def name(label: str, speaker: str) -> str:
        n = counters[(label, speaker)]
        counters[(label, speaker)] += 1
        return f"{label}/{file_stem(speaker)}_nohash_{n}.wav"

    def speech(label: str, word: str, voice: str, variant: str, base_speed: int, base_pitch: int) -> ClipSpec:
        speaker = f"{voice}+{variant}"
        speed = int(np.clip(base_speed + rng.integers(-20, 21), *SPEED_RANGE))
        pitch = int(np.clip(base_pitch + rng.integers(-15, 16), *PITCH_RANGE))
        level = float(rng.uniform(*SPEECH_PEAK_DBFS))
        snr = float(rng.uniform(cfg.snr_db, cfg.snr_db + SNR_SPAN_DB)) if cfg.noise else None
        colour = A.NOISE_COLOURS[int(rng.integers(len(A.NOISE_COLOURS)))]
        return ClipSpec(name(label, speaker), label, speaker, voice, variant, word, speed, pitch, level, snr,
                        colour, int(rng.integers(2**63)))

    for voice, variant in _speakers(cfg, rng):
        base_speed = int(rng.integers(140, 181))
        base_pitch = int(rng.integers(35, 66))
        for word in KEYWORDS:
            for _ in range(cfg.clips_per_word):
                specs.append(speech(word, word, voice, variant, base_speed, base_pitch))
        if cfg.unknown_per_speaker:
            reps = -(-cfg.unknown_per_speaker // len(cfg.unknown_words))
            words = np.concatenate([rng.permutation(len(cfg.unknown_words)) for _ in range(reps)])
            for w in words[: cfg.unknown_per_speaker]:
                specs.append(speech(UNKNOWN, cfg.unknown_words[int(w)], voice, variant, base_speed, base_pitch))

    n_noise = min(cfg.silence_clips, MAX_NOISE_SPEAKERS)
    for i in range(cfg.silence_clips):
        speaker = f"noise-{i % n_noise}"
        colour = ("white", "pink", "brown", "quiet")[int(rng.choice(4, p=(0.25, 0.3, 0.25, 0.2)))]
        level = float(rng.uniform(*(NEAR_SILENCE_DBFS if colour == "quiet" else SILENCE_NOISE_DBFS)))
        specs.append(ClipSpec(name(SILENCE, speaker), SILENCE, speaker, "noise", colour, "", None, None, level,
                              None, colour, int(rng.integers(2**63))))
    return specs


def render(spec: ClipSpec, binary: str = ESPEAK) -> np.ndarray:
    """The 1 s, 16 kHz waveform of one planned clip."""
    rng = np.random.default_rng(spec.noise_seed)
    if spec.label == SILENCE:
        colour = "white" if spec.noise_colour == "quiet" else spec.noise_colour
        return A.coloured_noise(colour, CLIP_SAMPLES, rng) * A.db_to_amplitude(spec.level_dbfs)
    raw, sr = synthesize(spec.word, f"{spec.voice}+{spec.variant}", spec.speed, spec.pitch, ESPEAK_AMPLITUDE, binary)
    word = A.trim_silence(A.resample(raw, sr))
    peak = float(np.abs(word).max())
    if peak <= 0.0:
        raise RuntimeError("synthesized audio is silent")
    word = word * (A.db_to_amplitude(spec.level_dbfs) / peak)
    clip = A.fix_length(word)
    if spec.snr_db is None:
        return clip
    noise = A.coloured_noise(spec.noise_colour, CLIP_SAMPLES, rng)
    return A.mix_at_snr(clip, noise, spec.snr_db, signal_power=float(np.mean(np.square(word, dtype=np.float64))))


def prepare_out(out: Path, files: Sequence[str], folders: Sequence[str], overwrite: bool) -> None:
    """Clear what a previous synth wrote (``files`` and ``folders`` under ``out``) and make the folders.

    Raises FileExistsError when any of them exists and ``overwrite`` is False; anything else in the
    folder is left alone.
    """
    existing = [out / p for p in (*files, *folders) if (out / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0].name}); replace it with --overwrite (overwrite=True from Python)")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)


def render_all(items: Sequence[T], job: Callable[[T], R], workers: int | None, progress: bool) -> tuple[dict[int, R], dict[int, str]]:
    """Run ``job`` on every item in a thread pool: (results, errors), both keyed by item index.

    One failing item must not sink a whole corpus, so exceptions become error strings. espeak-ng
    runs in subprocesses, so threads suffice; on Ctrl-C the queued items are dropped.
    """
    results: dict[int, R] = {}
    errors: dict[int, str] = {}
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        futures = {pool.submit(job, item): i for i, item in enumerate(items)}
        for fut in track(as_completed(futures), total=len(futures), description="synthesizing", disable=not progress):
            try:
                results[futures[fut]] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported per item
                errors[futures[fut]] = f"{type(exc).__name__}: {exc}"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, errors


def synthesize_corpus(cfg: SynthConfig, progress: bool = True) -> SynthSummary:
    """Write the corpus and ``metadata.csv`` under ``cfg.out``; failed clips are skipped and reported."""
    started = time.perf_counter()
    binary = espeak_binary(cfg.espeak)
    check_speakers(list(cfg.voices), list(cfg.variants), binary)
    specs = plan(cfg)
    out = Path(cfg.out)
    prepare_out(out, [METADATA], LABELS, cfg.overwrite)
    _, failed = render_all(specs, lambda spec: A.write_wav(out / spec.path, render(spec, binary)), cfg.workers, progress)
    errors = {specs[i].path: reason for i, reason in failed.items()}

    written = [s for s in specs if s.path not in errors]
    with open(out / METADATA, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(s.row() for s in written)

    counts = Counter(s.label for s in written)
    return SynthSummary(
        out=out,
        counts={label: counts.get(label, 0) for label in LABELS},
        speakers=len({s.speaker for s in written if s.label != SILENCE}),
        noise_speakers=len({s.speaker for s in written if s.label == SILENCE}),
        failures=sorted(errors.items()),
        seconds=time.perf_counter() - started,
    )
