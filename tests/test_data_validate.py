"""The clip checks on real files: each kind of bad file gets a reason naming it, good files pass."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from data_fixtures import TONE, appledouble, nan_wav, wrong_rate_wav, zero_frame_wav
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldfleet.common.data.audio import load_clip
from ldfleet.common.data.validate import BadClip, is_candidate, is_clip_dir, read_checked

BAD_FILES = {
    "nan": (nan_wav, "non-finite"),
    "inf": (lambda p: nan_wav(p, np.inf), "non-finite"),
    "zero_frames": (zero_frame_wav, "0 audio frames"),
    "appledouble": (appledouble, "not decodable"),
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * 8) and p, "not decodable"),
    "truncated_header": (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ") and p, "not decodable"),
    "empty_file": (lambda p: p.write_bytes(b"") and p, "not decodable"),
    "rate_100hz": (wrong_rate_wav, "implausible sample rate 100 Hz"),
    "rate_1mhz": (lambda p: wrong_rate_wav(p, 1_000_000), "implausible sample rate 1000000 Hz"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_every_kind_of_bad_file_is_refused_with_its_path_and_reason(tmp_path, kind):
    make, reason = BAD_FILES[kind]
    path = tmp_path / f"{kind}.wav"
    make(path)
    with pytest.raises(BadClip) as info:
        read_checked(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(path) in str(info.value)
    with pytest.raises(BadClip):  # the one way clips enter the model checks too: no IndexError from the trimmer
        load_clip(path)
    assert info.value.skipped().path == str(path)


def test_good_files_pass_at_any_plausible_rate_and_channel_count(tmp_path):
    for sr, channels in ((8000, 1), (16000, 2), (44100, 1), (192000, 1)):
        path = tmp_path / f"{sr}_{channels}.wav"
        sf.write(path, np.stack([TONE] * channels, axis=1), sr)
        data, rate = read_checked(path)
        assert rate == sr and data.shape == (len(TONE), channels) and np.isfinite(data).all()


def test_a_nan_window_is_refused_but_the_rest_of_the_file_reads(tmp_path):
    path = nan_wav(tmp_path / "n.wav")
    assert read_checked(path, start=1000, frames=500)[0].shape == (500, 1)
    with pytest.raises(BadClip, match="first at frame 100"):
        read_checked(path, start=0, frames=500)


def test_hidden_and_non_audio_entries_are_never_candidates(tmp_path):
    appledouble(tmp_path / "._a_nohash_0.wav")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "README.md").write_text("x")
    sf.write(tmp_path / "a_nohash_0.WAV", TONE, 16000)
    (tmp_path / "dir.wav").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / ".git").mkdir()
    names = sorted(p.name for p in tmp_path.iterdir() if is_candidate(p))
    assert names == ["a_nohash_0.WAV"]
    assert not is_clip_dir(tmp_path / "__MACOSX") and not is_clip_dir(tmp_path / ".git")
    assert is_clip_dir(tmp_path / "dir.wav")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(0, 400), channels=st.integers(1, 2), rate=st.sampled_from((100, 4000, 8000, 22050, 48000)),
       bad=st.lists(st.tuples(st.integers(0, 399), st.sampled_from((np.nan, np.inf, -np.inf))), max_size=3),
       subtype=st.sampled_from(("FLOAT", "DOUBLE")))
def test_read_checked_refuses_exactly_the_bad_files(tmp_path, frames, channels, rate, bad, subtype):
    audio = np.full((frames, channels), 0.25, dtype=np.float64)
    for index, value in bad:
        if index < frames:
            audio[index, index % channels] = value
    path = tmp_path / "x.wav"
    sf.write(path, audio, rate, subtype=subtype)
    expected = ("implausible sample rate" if rate < 8000 else "0 audio frames" if frames == 0
                else "non-finite" if not np.isfinite(audio).all() else None)
    if expected is None:
        data, sr = read_checked(path)
        assert data.shape == (frames, channels) and sr == rate
    else:
        with pytest.raises(BadClip, match=expected):
            read_checked(path)
