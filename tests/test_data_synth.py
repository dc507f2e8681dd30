"""The espeak-ng corpus: layout, metadata, determinism, audibility, failure handling (real espeak-ng)."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import typer
from typer.testing import CliRunner

from ldfleet.commands.data import register
from ldfleet.common.data import audio as A
from ldfleet.common.data.espeak import EspeakError
from ldfleet.common.data.folder import load_splits
from ldfleet.common.data.labels import CLIP_SAMPLES, KEYWORDS, LABELS, SAMPLE_RATE, SILENCE, UNKNOWN
from ldfleet.common.data.synth import METADATA, METADATA_COLUMNS, SynthConfig, file_stem, synthesize_corpus

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")

UNKNOWN_WORDS = ("bed", "cat", "marvin")


def tiny(out: Path, **overrides) -> SynthConfig:
    """4 speakers x (10 keywords + 2 unknown) + 4 silence = 52 clips: about a second of synthesis."""
    cfg = SynthConfig(out=out, voices=("en-us", "en-gb"), variants=("m3", "f2", "klatt", "f5"), variants_per_voice=2,
                      clips_per_word=1, unknown_words=UNKNOWN_WORDS, unknown_per_speaker=2, silence_clips=4, workers=2)
    return replace(cfg, **overrides)


def read_metadata(root: Path) -> list[dict[str, str]]:
    with open(root / METADATA, newline="") as f:
        return list(csv.DictReader(f))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("kws") / "seed0"
    return out, synthesize_corpus(tiny(out, seed=0), progress=False)


def test_layout_metadata_and_labels(corpus):
    root, summary = corpus
    rows = read_metadata(root)
    assert tuple(rows[0].keys())[: 8] == ("path", "label", "speaker", "voice", "variant", "speed", "pitch", "word")
    assert tuple(rows[0].keys()) == METADATA_COLUMNS
    assert not summary.failures
    assert len(rows) == summary.clips == 4 * (len(KEYWORDS) + 2) + 4
    assert len(list(root.rglob("*.wav"))) == len(rows)  # nothing on disk that metadata does not describe
    assert summary.counts == {label: sum(r["label"] == label for r in rows) for label in LABELS}
    for r in rows:
        folder, name = r["path"].split("/")
        assert folder == r["label"] in LABELS
        assert name.startswith(file_stem(r["speaker"]) + "_nohash_")
        info = sf.info(root / r["path"])
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, 1, CLIP_SAMPLES, "PCM_16")
        if r["label"] in KEYWORDS:
            assert r["word"] == r["label"] and r["speaker"] == f"{r['voice']}+{r['variant']}"
            assert 120 <= int(r["speed"]) <= 200 and 20 <= int(r["pitch"]) <= 80
        elif r["label"] == UNKNOWN:
            assert r["word"] in UNKNOWN_WORDS
        else:
            assert r["speaker"].startswith("noise-") and r["word"] == ""
    speakers = {r["speaker"] for r in rows if r["label"] != SILENCE}
    assert len(speakers) == summary.speakers == 4
    assert {s.split("+")[1] for s in speakers} <= {"m3", "f2", "klatt", "f5"}


def test_same_seed_is_byte_identical_other_seed_differs(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "again"
    synthesize_corpus(tiny(again, seed=0, workers=1), progress=False)  # other worker count, same bytes
    assert tree_bytes(again) == tree_bytes(root)
    other = tmp_path / "other"
    synthesize_corpus(tiny(other, seed=1), progress=False)
    a, b = tree_bytes(root), tree_bytes(other)
    assert a[METADATA] != b[METADATA]
    shared = set(a) & set(b)
    assert sum(a[k] != b[k] for k in shared) > 0.9 * len(shared)


def test_speech_is_audible_and_silence_is_quiet(corpus):
    root, _ = corpus
    for r in read_metadata(root):
        audio, _ = sf.read(root / r["path"], dtype="float32")
        level = A.rms(audio)
        if r["label"] == SILENCE:
            assert level < 0.005, r["path"]
        else:
            assert level > 0.008, r["path"]
            # the word is centred: the loudest 10 ms frame is not at the clip's edges
            loudest = int(np.argmax(A.frame_rms(audio)))
            assert 10 < loudest < len(audio) // 160 - 10, r["path"]


def test_corpus_loads_with_metadata_speakers_and_disjoint_splits(corpus):
    root, _ = corpus
    splits = load_splits(root, seed=0, fractions=(0.5, 0.25, 0.25))
    assert sum(len(d) for d in splits.values()) == len(read_metadata(root))
    speakers = {name: set(d.speakers) for name, d in splits.items()}
    # ids come from metadata.csv ("en-us+m3"), not from the sanitized file names ("en-us_m3")
    assert set().union(*speakers.values()) == {r["speaker"] for r in read_metadata(root)}
    assert not (speakers["train"] & speakers["val"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["val"] & speakers["test"])
    assert all(len(d) > 0 for d in splits.values())


def test_failed_clips_are_skipped_and_reported(tmp_path):
    flaky = tmp_path / "espeak-flaky"  # real espeak-ng, except that it refuses the word "no"
    flaky.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "no" ] && { echo "Error: simulated" >&2; exit 1; }; done\n'
                     f'exec {shutil.which("espeak-ng")} "$@"\n')
    flaky.chmod(0o755)
    out = tmp_path / "c"
    summary = synthesize_corpus(tiny(out, espeak=str(flaky)), progress=False)
    assert len(summary.failures) == 4 and all(path.startswith("no/") for path, _ in summary.failures)
    assert all("simulated" in reason for _, reason in summary.failures)
    assert summary.counts["no"] == 0 and summary.counts["yes"] == 4
    assert not any(r["label"] == "no" for r in read_metadata(out))


def test_missing_espeak_and_bad_variant_fail_clearly(tmp_path):
    with pytest.raises(EspeakError, match="apt-get install espeak-ng"):
        synthesize_corpus(tiny(tmp_path / "a", espeak="/nonexistent/espeak-ng"), progress=False)
    with pytest.raises(EspeakError, match="notavariant"):
        synthesize_corpus(tiny(tmp_path / "b", variants=("m3", "notavariant")), progress=False)
    assert not (tmp_path / "b").exists()  # checked before anything was written
    with pytest.raises(ValueError, match="variants_per_voice"):
        synthesize_corpus(tiny(tmp_path / "c", variants_per_voice=9), progress=False)


def test_existing_corpus_needs_overwrite_which_replaces_only_ours(corpus, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(corpus[0], out)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_corpus(tiny(out), progress=False)
    (out / "yes" / "stale_nohash_0.wav").write_bytes(b"x")
    (out / "README.txt").write_text("mine")
    synthesize_corpus(tiny(out, overwrite=True, silence_clips=2), progress=False)
    assert not (out / "yes" / "stale_nohash_0.wav").exists()
    assert (out / "README.txt").read_text() == "mine"
    assert len(list((out / SILENCE).glob("*.wav"))) == 2


def test_cli_synth_and_info(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--voices", "en-us", "--variants", "m1,f3",
                                 "--variants-per-voice", "2", "--clips-per-word", "1", "--unknown-words", "bed,dog",
                                 "--unknown-per-speaker", "1", "--silence-clips", "2", "--no-noise", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "_silence_" in result.output and "speakers: 2" in result.output
    rows = read_metadata(out)
    assert len(rows) == 2 * 11 + 2 and all(r["snr_db"] == "" for r in rows)
    info = runner.invoke(app, ["data", "info", str(out), "--fractions", "0.5,0.5,0"])
    assert info.exit_code == 0, info.output
    assert "speakers" in info.output and "bed" in info.output
    missing = runner.invoke(app, ["data", "info", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    again = runner.invoke(app, ["data", "synth", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--voices", "99"])
    assert bad.exit_code != 0 and "voices" in bad.output


def test_cli_reports_missing_espeak(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng anywhere on PATH
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "apt-get install espeak-ng" in result.output
    assert os.environ["PATH"] == str(tmp_path)
