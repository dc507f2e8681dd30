"""Clip handling: whatever goes in, exactly 1 s of 16 kHz mono comes out."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from ldfleet.common.data import audio as A
from ldfleet.common.data.labels import CLIP_SAMPLES, SAMPLE_RATE


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_resample_22050_to_16k_keeps_duration_and_pitch():
    x = tone(1.0, 22050, freq=1000.0)
    y = A.resample(x, 22050)
    assert y.dtype == np.float32 and len(y) == SAMPLE_RATE
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * SAMPLE_RATE / len(y)
    assert abs(peak_hz - 1000.0) <= 2.0


@pytest.mark.parametrize("sr,channels,seconds", [(22050, 1, 1.6), (44100, 2, 0.4), (16000, 1, 1.0), (8000, 2, 2.5)])
def test_load_clip_gives_exactly_one_second_at_16k(tmp_path, sr, channels, seconds):
    word = tone(seconds, sr)
    data = np.stack([word] * channels, axis=1) if channels > 1 else word
    path = tmp_path / "x.wav"
    sf.write(path, data, sr)
    clip = A.load_clip(path)
    assert clip.shape == (CLIP_SAMPLES,) and clip.dtype == np.float32
    assert A.rms(clip) > 0.1  # the tone survived mono mixing and resampling


def test_trim_then_centre_moves_a_late_word_to_the_middle(tmp_path):
    # espeak-like: a 0.3 s word followed by 1 s of silence; naive cutting would keep only silence
    sr = 22050
    audio = np.concatenate([np.zeros(int(0.9 * sr)), tone(0.3, sr), np.zeros(sr)]).astype(np.float32)
    sf.write(tmp_path / "late.wav", audio, sr)
    clip = A.load_clip(tmp_path / "late.wav")
    loud = np.flatnonzero(np.abs(clip) > 0.05)
    centre = (loud[0] + loud[-1]) / 2
    assert abs(centre - CLIP_SAMPLES / 2) < 0.02 * SAMPLE_RATE
    assert 0.28 * SAMPLE_RATE < loud[-1] - loud[0] < 0.36 * SAMPLE_RATE  # the word itself is intact


def test_trim_keeps_silent_input_unchanged():
    zeros = np.zeros(1000, dtype=np.float32)
    assert len(A.trim_silence(zeros)) == 1000


def test_fix_length_pads_and_cuts_symmetrically():
    short = np.ones(100, dtype=np.float32)
    padded = A.fix_length(short, 300)
    assert len(padded) == 300 and padded[:100].sum() == 0 and padded[100:200].sum() == 100 and padded[200:].sum() == 0
    long = np.arange(500, dtype=np.float32)
    cut = A.fix_length(long, 300)
    assert len(cut) == 300 and cut[0] == 100 and cut[-1] == 399


def test_write_wav_is_16_bit_pcm_and_clips_instead_of_wrapping(tmp_path):
    path = tmp_path / "loud.wav"
    A.write_wav(path, np.array([0.5, 1.7, -3.0], dtype=np.float32))
    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == SAMPLE_RATE and info.channels == 1
    back, _ = sf.read(path, dtype="int16")
    assert back[1] == 32767 and back[2] <= -32767  # saturated, not wrapped to the other sign


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_mix_at_snr_hits_the_requested_snr(snr_db):
    rng = np.random.default_rng(0)
    clean = tone(1.0, SAMPLE_RATE)
    noise = A.coloured_noise("white", len(clean), rng)
    mixed = A.mix_at_snr(clean, noise, snr_db)
    added = mixed - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2))
    assert measured == pytest.approx(snr_db, abs=0.05)


def test_coloured_noise_has_more_low_frequency_power_the_redder_it_is():
    rng = np.random.default_rng(1)

    def low_share(colour: str) -> float:
        power = np.abs(np.fft.rfft(A.coloured_noise(colour, 16000, rng))) ** 2
        return power[:400].sum() / power.sum()  # below 400 Hz

    white, pink, brown = low_share("white"), low_share("pink"), low_share("brown")
    assert white < pink < brown
    assert A.rms(A.coloured_noise("pink", 16000, rng)) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="colour"):
        A.coloured_noise("purple", 10, rng)
