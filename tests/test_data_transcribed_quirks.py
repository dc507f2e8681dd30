"""Transcribed corpora as people really write them: Excel's byte-order mark, other encodings, a
`text` column, `metadata.jsonl`, per-split folders, Windows paths, blank rows, null transcripts,
paths relative to the wrong folder; and the warnings a corpus earns (files listed twice, no
speakers, a speaker in test and train, empty transcripts, long clips, wrong durations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ldfleet.cli import app
from ldfleet.common.data.transcribed import assign_transcribed_splits, corpus_warnings, is_transcribed, read_manifest, scan_transcribed

cli = CliRunner()


def _wav(path: Path, seconds: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(0).uniform(-0.1, 0.1, int(seconds * 16000)).astype(np.float32), 16000)


def test_bom_crlf_and_a_text_column_read_as_written(tmp_path):
    _wav(tmp_path / "clips" / "a.wav")
    _wav(tmp_path / "clips" / "b.wav")
    (tmp_path / "metadata.csv").write_bytes("file_name,text,speaker\r\nclips/a.wav,\"caf\u00e9, please\",s1\r\n,,\r\nclips\\b.wav,no,s2\r\n".encode("utf-8-sig"))
    assert is_transcribed(tmp_path)
    items = scan_transcribed(tmp_path)
    assert [(u.path.name, u.text, u.speaker) for u in items] == [("a.wav", "caf\u00e9, please", "s1"), ("b.wav", "no", "s2")]


def test_an_encoding_other_than_utf8_is_refused_with_the_reason(tmp_path):
    _wav(tmp_path / "a.wav")
    (tmp_path / "metadata.csv").write_bytes("file_name,transcription\na.wav,caf\u00e9\n".encode("latin-1"))
    assert is_transcribed(tmp_path)
    with pytest.raises(ValueError, match="is not UTF-8 .*0xe9.*save it as UTF-8"):
        scan_transcribed(tmp_path)
    out = cli.invoke(app, ["data", "info", str(tmp_path)])
    assert out.exit_code == 1 and "not UTF-8" in out.output and "Traceback" not in out.output


def test_metadata_jsonl_and_per_split_folders(tmp_path):
    jsonl = tmp_path / "j"
    _wav(jsonl / "a.wav")
    (jsonl / "metadata.jsonl").write_text(json.dumps({"file_name": "a.wav", "transcription": "go", "speaker": "s1"}) + "\n")
    assert is_transcribed(jsonl) and scan_transcribed(jsonl)[0].text == "go"

    hf = tmp_path / "hf"
    for split, name in (("train", "a"), ("validation", "b"), ("test", "c")):
        _wav(hf / split / f"{name}.wav")
        (hf / split / "metadata.csv").write_text(f"file_name,transcription\n{name}.wav,word {name}\n")
    assert is_transcribed(hf)
    items = scan_transcribed(hf)
    assert sorted((u.path.name, u.split) for u in items) == [("a.wav", "train"), ("b.wav", "val"), ("c.wav", "test")]


def test_manifest_null_text_and_paths_relative_to_the_wrong_folder(tmp_path, monkeypatch):
    man = tmp_path / "m" / "train.jsonl"
    man.parent.mkdir()
    man.write_text(json.dumps({"audio_filepath": "x.wav", "text": None}) + "\n")
    _wav(man.parent / "x.wav")
    with pytest.raises(ValueError, match="line 1: text must be a string, got null"):
        read_manifest(man)
    monkeypatch.chdir(tmp_path)
    man.write_text(json.dumps({"audio_filepath": "m/x.wav", "text": "hi"}) + "\n")  # relative to the current folder
    with pytest.raises(ValueError, match="relative paths are read from the manifest's folder"):
        read_manifest(man)


def test_corpus_warnings_and_data_info_lengths(tmp_path):
    for name, seconds in (("a.wav", 0.5), ("b.wav", 0.5), ("long.wav", 31.0)):
        _wav(tmp_path / name, seconds)
    (tmp_path / "metadata.csv").write_text("file_name,transcription,split,duration\na.wav,one,train,0.5\na.wav,one,train,0.5\n"
                                           "b.wav,,validation,0.5\nlong.wav,two,test,99\n")
    items = scan_transcribed(tmp_path)
    warnings = corpus_warnings(items, assign_transcribed_splits(items))
    assert any("listed more than once (e.g. a.wav)" in w for w in warnings)
    assert any("1 utterance(s) with an empty transcript" in w for w in warnings)
    assert not any("no speaker column" in w for w in warnings)  # the split column keeps test voices apart
    out = cli.invoke(app, ["data", "info", str(tmp_path), "--json"])
    facts = json.loads(out.stdout)
    assert facts["splits"]["test"]["longest_s"] == pytest.approx(31.0) and facts["splits"]["train"]["seconds"] == pytest.approx(1.0)
    text = " ".join(facts["warnings"])
    assert "1 clip(s) longer than 30 s (longest long.wav: 31 s)" in text
    assert "1 duration field(s) disagree with the audio (e.g. long.wav: 99 s stated, 31.00 s read)" in text

    (tmp_path / "metadata.csv").write_text("file_name,transcription\na.wav,one\nb.wav,two\n")
    items = scan_transcribed(tmp_path)
    assert any("no speaker column" in w for w in corpus_warnings(items, assign_transcribed_splits(items)))
    (tmp_path / "metadata.csv").write_text("file_name,transcription,speaker,split\na.wav,one,s1,train\nb.wav,two,s1,test\n")
    items = scan_transcribed(tmp_path)
    assert any("1 speaker(s) in test and another split (e.g. 's1')" in w for w in corpus_warnings(items, assign_transcribed_splits(items)))


def _keyword_folder(root: Path, words=("yes", "no", "go"), speakers: int = 10) -> Path:
    for word in words:
        for i in range(speakers):
            _wav(root / word / f"spk{i:02d}_nohash_0.wav", 1.0)
    return root


def test_a_listed_label_without_clips_is_refused_and_left_out_words_are_named(tmp_path, caplog):
    from ldfleet.common.data.loading import label_set_warnings

    warnings = label_set_warnings(("yes", "Go", "upp"), ["yes", "no", "go"], ["yes", "no", "no", "go"])
    assert "label 'Go' has no folder (there is 'go': folders are matched exactly)" in warnings
    assert "label 'upp' has no folder" in warnings
    assert any(w.startswith("3 clip(s) of words outside the label set left out (go, no)") for w in warnings)

    data = _keyword_folder(tmp_path / "kws")
    out = cli.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--labels", "yes,no,upp", "--epochs", "1"])
    assert out.exit_code == 2 and "label(s) ['upp'] have no clips" in " ".join(out.output.split())
    shouty = cli.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--labels", "Yes,No", "--epochs", "1"])
    assert shouty.exit_code == 2 and "label(s) ['Yes', 'No'] have no clips" in " ".join(shouty.output.split())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_rows_that_would_be_misread_are_refused_and_a_partial_split_column_is_said(tmp_path):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    (tmp_path / "metadata.csv").write_text("file_name,transcription,speaker\na.wav,yes, turn on the light,en\n")
    with pytest.raises(ValueError, match=r"line 2: 4 fields for 3 columns; quote a transcript"):
        scan_transcribed(tmp_path)
    (tmp_path / "metadata.csv").write_bytes("file_name,transcription\na.wav,caf\u00e9\n".encode("utf-16"))  # Excel's "Unicode text"
    assert scan_transcribed(tmp_path)[0].text == "caf\u00e9"
    (tmp_path / "metadata.csv").write_text("filename,transcription\na.wav,yes\n")  # a misspelt column: said, not read as keywords
    assert is_transcribed(tmp_path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['file_name'\]"):
        scan_transcribed(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    for value in ("null", "42", '{"nested": "obj"}'):
        (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav", "transcription": %s}\n' % value)
        with pytest.raises(ValueError, match="line 1: transcription must be a string"):
            scan_transcribed(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,transcription,speaker,split\na.wav,one,s1,train\nb.wav,two,s2,\n")
    items = scan_transcribed(tmp_path)
    assert any("the split column is empty on 1 of 2 rows, so it is not used" in w for w in corpus_warnings(items, assign_transcribed_splits(items)))


def test_max_seconds_leaves_long_training_clips_out(tmp_path, capsys):
    from ldfleet.commands.model import _without_long_clips
    from ldfleet.common.data.transcribed import load_transcribed_splits

    for name, seconds in (("a.wav", 0.5), ("b.wav", 12.0), ("c.wav", 0.7)):
        _wav(tmp_path / name, seconds)
    (tmp_path / "metadata.csv").write_text("file_name,transcription,speaker,split\na.wav,one,s1,train\nb.wav,two,s1,train\n"
                                           "c.wav,three,s2,test\n")
    train = load_transcribed_splits(tmp_path)["train"]
    kept = _without_long_clips(train, 10.0)
    assert [u.path.name for u in kept.items] == ["a.wav"] and len(kept.waves) == 1
    assert "1 of 2 training clips left out (the longest 12.0 s)" in capsys.readouterr().err
    assert _without_long_clips(train, 20.0).texts == train.texts
