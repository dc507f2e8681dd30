"""A speech-recognition corpus spoken by espeak-ng, written as a Hugging Face audiofolder.

Utterances are short phrases of several words — commands ("turn on the light"), digit strings
("dial four seven two"), names ("call olivia") — so a small closed vocabulary gives many distinct
sentences. A *speaker* is an espeak-ng voice (English accents, and other languages reading the
English text as foreign accents) plus a variant (timbre), with its own base speed and pitch.
Every clip also draws a recording *condition*, so inputs really differ in difficulty:

* speed and pitch around the speaker's own;
* background noise (white/pink/brown) at an SNR from :data:`SNR_LEVELS` (``None`` = clean);
* a channel from :data:`CHANNELS`: clean, ``telephone`` (8 kHz round trip + 300-3400 Hz band) or
  ``reverb`` (a synthetic exponentially decaying room response, RT60 0.3-0.9 s).

Output: ``OUT/metadata.csv`` with ``file_name,transcription,speaker`` first (what any audiofolder
reader needs), then ``split`` (train / validation / test, whole speakers per split) and the
condition columns; audio in ``OUT/clips/``. Like the keyword corpus, every random draw is made up
front from one seeded generator, so the corpus is byte-identical for a seed.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from . import audio as A
from .espeak import ACCENT_VOICES, DEFAULT_VARIANTS, ENGLISH_VOICES, ESPEAK, check_speakers, espeak_binary, synthesize
from .labels import SAMPLE_RATE
from .splits import DEFAULT_FRACTIONS, split_by_speaker
from .synth import ESPEAK_AMPLITUDE, file_stem, prepare_out, render_all

METADATA = "metadata.csv"
CLIP_DIR = "clips"
METADATA_COLUMNS = (
    "file_name", "transcription", "speaker", "split", "voice", "variant", "speed", "pitch", "snr_db", "channel",
    "duration",
)
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}  # ours -> Hugging Face's

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAMES = ("alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "olivia", "peter")
ACTIONS = ("turn on", "turn off", "open", "close", "start", "stop")
THINGS = ("light", "door", "window", "music", "radio", "heater", "fan", "timer")
SNR_LEVELS: tuple[float | None, ...] = (None, 30.0, 20.0, 10.0, 5.0)
SNR_WEIGHTS = (0.3, 0.2, 0.2, 0.2, 0.1)
CHANNELS = ("clean", "telephone", "reverb")
CHANNEL_WEIGHTS = (0.6, 0.2, 0.2)
SPEECH_PEAK_DBFS = (-16.0, -3.0)


@dataclass(frozen=True)
class AsrSynthConfig:
    """What to synthesize. The defaults give 6 480 utterances from 72 speakers (12 voices x 6, 90 each)."""

    out: Path
    seed: int = 0
    voices: tuple[str, ...] = ENGLISH_VOICES + ACCENT_VOICES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    variants_per_voice: int = 6
    # 90, not 30: with 30 the from-scratch model overfits its training speakers (README, ASR section)
    utterances_per_speaker: int = 90
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS  # train / validation / test, by speaker
    noise: bool = True
    workers: int | None = None
    overwrite: bool = False
    espeak: str = ESPEAK


@dataclass(frozen=True)
class Utterance:
    """Everything needed to render one utterance."""

    file_name: str
    transcription: str
    speaker: str
    voice: str
    variant: str
    speed: int
    pitch: int
    level_dbfs: float
    snr_db: float | None
    noise_colour: str
    channel: str
    seed: int


@dataclass
class AsrSynthSummary:
    out: Path
    utterances: int
    speakers: dict[str, int]  # split -> speakers
    clips: dict[str, int]  # split -> utterances
    seconds_of_audio: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def sentence(rng: np.random.Generator) -> str:
    """One phrase: a command, a call, a digit string or a named command, in equal shares."""
    kind = int(rng.integers(4))
    if kind == 0:
        return f"{ACTIONS[rng.integers(len(ACTIONS))]} the {THINGS[rng.integers(len(THINGS))]}"
    if kind == 1:
        return f"call {NAMES[rng.integers(len(NAMES))]}"
    if kind == 2:
        digits = " ".join(DIGITS[int(d)] for d in rng.integers(10, size=int(rng.integers(3, 6))))
        return digits if rng.random() < 0.5 else f"dial {digits}"
    return f"{NAMES[rng.integers(len(NAMES))]} {ACTIONS[rng.integers(len(ACTIONS))]} the {THINGS[rng.integers(len(THINGS))]}"


def _pick(rng: np.random.Generator, options: tuple, weights: tuple[float, ...]):
    return options[int(rng.choice(len(options), p=np.asarray(weights) / sum(weights)))]


def plan(cfg: AsrSynthConfig) -> list[Utterance]:
    """The ordered list of utterances for a config; a pure function of the config."""
    if cfg.utterances_per_speaker < 1 or cfg.variants_per_voice < 1:
        raise ValueError("utterances_per_speaker and variants_per_voice must be >= 1")
    pool = tuple(dict.fromkeys(cfg.variants))
    if cfg.variants_per_voice > len(pool):
        raise ValueError(f"variants_per_voice={cfg.variants_per_voice} but only {len(pool)} variants to draw from")
    rng = np.random.default_rng(cfg.seed)
    items: list[Utterance] = []
    for voice in dict.fromkeys(cfg.voices):
        for v in rng.choice(len(pool), size=cfg.variants_per_voice, replace=False):
            variant = pool[int(v)]
            speaker = f"{voice}+{variant}"
            base_speed, base_pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
            for n in range(cfg.utterances_per_speaker):
                items.append(Utterance(
                    file_name=f"{CLIP_DIR}/{file_stem(speaker)}_{n:03d}.wav",
                    transcription=sentence(rng),
                    speaker=speaker, voice=voice, variant=variant,
                    speed=int(np.clip(base_speed + rng.integers(-30, 31), 100, 230)),
                    pitch=int(np.clip(base_pitch + rng.integers(-15, 16), 10, 90)),
                    level_dbfs=float(rng.uniform(*SPEECH_PEAK_DBFS)),
                    snr_db=_pick(rng, SNR_LEVELS, SNR_WEIGHTS) if cfg.noise else None,
                    noise_colour=A.NOISE_COLOURS[int(rng.integers(len(A.NOISE_COLOURS)))],
                    channel=_pick(rng, CHANNELS, CHANNEL_WEIGHTS),
                    seed=int(rng.integers(2**63)),
                ))
    return items


# ---- channel effects -------------------------------------------------------------------------


def telephone(audio: np.ndarray) -> np.ndarray:
    """Narrow-band telephone: down to 8 kHz and back, then a 300-3400 Hz band-pass."""
    narrow = A.resample(A.resample(audio, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)
    sos = butter(4, (300, 3400), btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, narrow).astype(np.float32)


def reverb(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room response: direct path + exponentially decaying noise.

    RT60 (time for a 60 dB decay) is drawn in 0.3-0.9 s; amplitude decays as 10^(-3 t / RT60).
    """
    rt60 = float(rng.uniform(0.3, 0.9))
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    response = rng.standard_normal(len(t)) * 10.0 ** (-3.0 * t / rt60) * 0.3
    response[0] = 1.0
    wet = fftconvolve(audio, response)[: len(audio) + len(t) // 2]
    return (wet / max(1e-9, float(np.abs(wet).max())) * float(np.abs(audio).max())).astype(np.float32)


def render(item: Utterance, binary: str = ESPEAK) -> np.ndarray:
    """The 16 kHz waveform of one planned utterance: speech, channel, then noise."""
    rng = np.random.default_rng(item.seed)
    raw, sr = synthesize(item.transcription, item.speaker, item.speed, item.pitch, ESPEAK_AMPLITUDE, binary)
    speech = A.trim_silence(A.resample(raw, sr))
    if item.channel == "telephone":
        speech = telephone(speech)
    elif item.channel == "reverb":
        speech = reverb(speech, rng)
    peak = float(np.abs(speech).max())
    if peak <= 0.0:
        raise RuntimeError("synthesized audio is silent")
    speech = speech * (A.db_to_amplitude(item.level_dbfs) / peak)
    lead, tail = (int(rng.uniform(0.05, 0.25) * SAMPLE_RATE) for _ in range(2))
    clip = np.pad(speech, (lead, tail)).astype(np.float32)
    if item.snr_db is None:
        return clip
    noise = A.coloured_noise(item.noise_colour, len(clip), rng)
    return A.mix_at_snr(clip, noise, item.snr_db, signal_power=float(np.mean(np.square(speech, dtype=np.float64))))


def _row(item: Utterance, split: str, seconds: float) -> dict[str, str]:
    return {
        "file_name": item.file_name, "transcription": item.transcription, "speaker": item.speaker,
        "split": SPLIT_NAMES[split], "voice": item.voice, "variant": item.variant, "speed": str(item.speed),
        "pitch": str(item.pitch), "snr_db": "" if item.snr_db is None else f"{item.snr_db:g}",
        "channel": item.channel, "duration": f"{seconds:.3f}",
    }


def synthesize_asr_corpus(cfg: AsrSynthConfig, progress: bool = True) -> AsrSynthSummary:
    """Write the audiofolder under ``cfg.out``; failed utterances are skipped and reported."""
    started = time.perf_counter()
    binary = espeak_binary(cfg.espeak)
    check_speakers(list(cfg.voices), list(cfg.variants), binary)
    items = plan(cfg)
    speakers = [u.speaker for u in items]
    splits = split_by_speaker(speakers, cfg.fractions, cfg.seed, strata=[u.voice for u in items])
    out = Path(cfg.out)
    prepare_out(out, [METADATA], [CLIP_DIR], cfg.overwrite)

    def job(item: Utterance) -> float:
        wave = render(item, binary)
        A.write_wav(out / item.file_name, wave)
        return len(wave) / SAMPLE_RATE

    done, failed = render_all(items, job, cfg.workers, progress)
    durations = {items[i].file_name: seconds for i, seconds in done.items()}
    errors = {items[i].file_name: reason for i, reason in failed.items()}

    kept = [(u, s) for u, s in zip(items, splits) if u.file_name in durations]
    with open(out / METADATA, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_row(u, s, durations[u.file_name]) for u, s in kept)
    return AsrSynthSummary(
        out=out,
        utterances=len(kept),
        speakers={SPLIT_NAMES[s]: len({u.speaker for u, t in kept if t == s}) for s in SPLIT_NAMES},
        clips={SPLIT_NAMES[s]: n for s, n in Counter(t for _, t in kept).items()},
        seconds_of_audio=sum(durations.values()),
        failures=sorted(errors.items()),
        seconds=time.perf_counter() - started,
    )
