"""The Speech Commands folder loader on a hand-made folder shaped like the real data set."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from ldfleet.common.data.dataset import ClipDataset
from ldfleet.common.data.folder import describe, load_splits, scan_folder, speaker_from_filename
from ldfleet.common.data.labels import BACKGROUND_NOISE_DIR, CLIP_SAMPLES, LABEL_TO_ID, SILENCE, UNKNOWN

YES, NO, UNK, SIL = LABEL_TO_ID["yes"], LABEL_TO_ID["no"], LABEL_TO_ID[UNKNOWN], LABEL_TO_ID[SILENCE]
FILES = {
    "yes": ["aa11_nohash_0", "aa11_nohash_1", "bb22_nohash_0", "ee55_nohash_0"],
    "no": ["cc33_nohash_0", "aa11_nohash_0", "ff66_nohash_0"],
    "bed": ["aa11_nohash_0", "dd44_nohash_0"],
    "wow": ["dd44_nohash_0", "gg77_nohash_0"],
}
RATES = {"yes": 16000, "no": 22050, "bed": 44100, "wow": 8000}


def write_tone(path, seconds, sr, freq=300.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr)


@pytest.fixture
def sc_folder(tmp_path):
    """Real-SC shape: word folders, <speaker>_nohash_<n>.wav, _background_noise_ with a README."""
    root = tmp_path / "sc"
    for word, names in FILES.items():
        (root / word).mkdir(parents=True)
        for j, name in enumerate(names):  # mixed rates, channel counts, lengths below and above 1 s
            write_tone(root / word / f"{name}.wav", 0.6 + 0.3 * j, RATES[word], 200 + 50 * j, 1 + j % 2)
    bg = root / BACKGROUND_NOISE_DIR
    bg.mkdir()
    # 3.5 s whose second k is the constant 0.1 * (k + 1): makes window offsets checkable
    sf.write(bg / "steps.wav", np.repeat([0.1, 0.2, 0.3, 0.4], 16000)[:56000], 16000)
    sf.write(bg / "noise44k.wav", np.random.default_rng(0).normal(0, 0.05, (int(2.2 * 44100), 2)), 44100)
    (bg / "README.md").write_text("not audio")
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    write_tone(root / ".hidden" / "x_nohash_0.wav", 0.5, 16000)
    return root


def test_speaker_from_filename_follows_speech_commands_convention():
    assert speaker_from_filename("0a7c2a8d_nohash_3.wav") == "0a7c2a8d"
    assert speaker_from_filename("en-us_f3_nohash_12.wav") == "en-us_f3"
    assert speaker_from_filename("recording.wav") == "recording"


def test_scan_maps_words_to_classes_and_cuts_background_noise(sc_folder):
    clips = scan_folder(sc_folder)
    by_word: dict[str, set[int]] = {}
    for c in clips:
        by_word.setdefault(c.word, set()).add(c.label)
    assert by_word == {"yes": {YES}, "no": {NO}, "bed": {UNK}, "wow": {UNK}, BACKGROUND_NOISE_DIR: {SIL}}
    windows = [c for c in clips if c.word == BACKGROUND_NOISE_DIR]
    assert len(windows) == 3 + 2  # whole seconds of 3.5 s and 2.2 s; the README is skipped
    assert len(clips) == sum(map(len, FILES.values())) + 5  # .hidden/ and notes.txt are skipped
    assert sorted({c.speaker for c in clips if c.label == YES}) == ["aa11", "bb22", "ee55"]
    assert [c.rel for c in clips] == [c.rel for c in scan_folder(sc_folder)]  # deterministic order


def test_dataset_gives_one_second_float_clips_and_exact_noise_windows(sc_folder):
    clips = scan_folder(sc_folder)
    data = ClipDataset(clips)
    assert len(data) == len(clips) and data.waveforms.shape == (len(clips), CLIP_SAMPLES)
    for i in range(len(data)):
        wave, label = data[i]
        assert wave.dtype == torch.float32 and wave.shape == (CLIP_SAMPLES,) and isinstance(label, int)
        assert label == clips[i].label and data.speakers[i] == clips[i].speaker
        if label != SIL:
            assert wave.abs().max() > 0.2  # the tone is there after mono mixing, resampling, trimming
    steps = [i for i, c in enumerate(clips) if c.rel.startswith(f"{BACKGROUND_NOISE_DIR}/steps.wav")]
    means = [float(data[i][0].mean()) for i in steps]
    assert means == pytest.approx([0.1, 0.2, 0.3], abs=1e-3)  # window k is second k, untrimmed
    lazy = ClipDataset(clips, preload=False)
    assert torch.equal(lazy[3][0], data[3][0])
    sub = data.subset([4, 1])
    assert len(sub) == 2 and torch.equal(sub[0][0], data[4][0]) and sub.speakers == [data.speakers[4], data.speakers[1]]


def test_speaker_split_holds_out_whole_speakers_and_covers_everything(sc_folder):
    splits = load_splits(sc_folder, seed=3, fractions=(0.5, 0.25, 0.25))
    assert sum(len(d) for d in splits.values()) == len(scan_folder(sc_folder))
    spk = {k: set(d.speakers) for k, d in splits.items()}
    assert not (spk["train"] & spk["val"] or spk["train"] & spk["test"] or spk["val"] & spk["test"])
    assert all(len(d) for d in splits.values())
    again = load_splits(sc_folder, seed=3, fractions=(0.5, 0.25, 0.25))
    assert {k: d.speakers for k, d in again.items()} == {k: d.speakers for k, d in splits.items()}


def test_official_lists_are_honoured(sc_folder):
    (sc_folder / "validation_list.txt").write_text("yes/bb22_nohash_0.wav\nbed/dd44_nohash_0.wav\n")
    (sc_folder / "testing_list.txt").write_text("no/cc33_nohash_0.wav\n")
    splits = load_splits(sc_folder, fractions=(0.6, 0.2, 0.2))
    rel = {k: {c.rel for c in d.clips if c.word != BACKGROUND_NOISE_DIR} for k, d in splits.items()}
    assert rel["val"] == {"yes/bb22_nohash_0.wav", "bed/dd44_nohash_0.wav"}
    assert rel["test"] == {"no/cc33_nohash_0.wav"}
    assert len(rel["train"]) == sum(map(len, FILES.values())) - 3  # unlisted clips train, as in SC
    assert describe(sc_folder).official_lists


def test_metadata_csv_overrides_filename_speakers(sc_folder):
    (sc_folder / "metadata.csv").write_text("path,label,speaker,word\nyes/aa11_nohash_0.wav,yes,en-us+f3,yes\n")
    speakers = {c.rel: c.speaker for c in scan_folder(sc_folder)}
    assert speakers["yes/aa11_nohash_0.wav"] == "en-us+f3"
    assert speakers["yes/aa11_nohash_1.wav"] == "aa11"  # not in metadata: filename convention


def test_describe_counts_without_loading_audio(sc_folder):
    stats = describe(sc_folder, seed=0, fractions=(0.5, 0.25, 0.25))
    total = {label: sum(stats.counts[s][label] for s in stats.counts) for label in ("yes", "no", UNKNOWN, SILENCE)}
    assert total == {"yes": 4, "no": 3, UNKNOWN: 4, SILENCE: 5}
    assert stats.words["bed"] == 2 and not stats.official_lists


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty" / "yes").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable audio clips"):
        load_splits(tmp_path / "empty")
    (tmp_path / "file.wav").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "file.wav")
