"""A Speech Commands folder with field quirks: bad files skipped and named, lists matched, nothing silent.

Real files throughout: soundfile/wave-written WAVs (a NaN float WAV, a zero-frame WAV, a 100 Hz WAV),
an AppleDouble companion, garbage bytes, list files written the ways people write them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from data_fixtures import TONE, appledouble, nan_wav, wrong_rate_wav, zero_frame_wav
from typer.testing import CliRunner

from ldfleet.cli import app
from ldfleet.common.data.folder import describe, load_folder, load_splits, scan
from ldfleet.common.data.labels import BACKGROUND_NOISE_DIR
from ldfleet.common.data.validate import BadClip

SPEAKERS = {"yes": ["aa11", "bb22", "ee55"], "no": ["cc33", "dd44", "ff66"]}


def good_folder(root):
    for word, speakers in SPEAKERS.items():
        (root / word).mkdir(parents=True)
        for s in speakers:
            sf.write(root / word / f"{s}_nohash_0.wav", TONE, 16000, subtype="PCM_16")
    (root / BACKGROUND_NOISE_DIR).mkdir()
    noise = np.random.default_rng(0).normal(0, 0.1, 5 * 16000).astype(np.float32)
    noise[2 * 16000 + 50] = np.nan  # window 2 of 5 is bad
    noise[4 * 16000 + 7] = np.inf  # and window 4
    sf.write(root / BACKGROUND_NOISE_DIR / "white.wav", noise, 16000, subtype="FLOAT")
    return root


@pytest.fixture
def quirky(tmp_path):
    root = good_folder(tmp_path / "sc")
    appledouble(root / "yes" / "._aa11_nohash_0.wav")
    (root / "yes" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "no" / "notes.txt").write_text("not audio")
    nan_wav(root / "yes" / "gg77_nohash_0.wav")
    zero_frame_wav(root / "no" / "hh88_nohash_0.wav")
    wrong_rate_wav(root / "no" / "ii99_nohash_0.wav")
    (root / "yes" / "jj00_nohash_0.wav").write_bytes(b"garbage" * 100)
    (root / "__MACOSX" / "yes").mkdir(parents=True)
    appledouble(root / "__MACOSX" / "yes" / "._bb22_nohash_0.wav")
    (root / "validation_list.txt").write_text("# val\r\n./yes/bb22_nohash_0.wav\r\n\r\n./yes/zz00_nohash_0.wav\r\n")
    (root / "testing_list.txt").write_bytes("no\\dd44_nohash_0.wav\nno\\hh88_nohash_0.wav\n".encode("utf-16"))
    return root


BAD = {"yes/gg77_nohash_0.wav": "non-finite", "no/hh88_nohash_0.wav": "0 audio frames",
       "no/ii99_nohash_0.wav": "implausible sample rate", "yes/jj00_nohash_0.wav": "not decodable",
       f"{BACKGROUND_NOISE_DIR}/white.wav#2": "non-finite", f"{BACKGROUND_NOISE_DIR}/white.wav#4": "non-finite"}


def test_bad_files_are_skipped_with_path_and_reason_and_never_become_clips(quirky):
    result = scan(quirky)
    rels = {c.rel for c in result.clips}
    assert rels == {f"{w}/{s}_nohash_0.wav" for w, ss in SPEAKERS.items() for s in ss} | {
        f"{BACKGROUND_NOISE_DIR}/white.wav#{k}" for k in (0, 1, 3)}
    got = {str(s.path).removeprefix(f"{quirky}/"): s.reason for s in result.skipped}
    assert set(got) == set(BAD) and all(BAD[p] in got[p] for p in BAD)
    assert result.ignored == {"hidden": 2, "not_audio": 1}  # AppleDouble + .DS_Store; notes.txt; __MACOSX unread


def test_strict_stops_at_the_first_bad_file_and_names_it(quirky):
    with pytest.raises(BadClip) as info:
        load_splits(quirky, strict=True)
    assert str(quirky) in str(info.value) and info.value.reason


def test_lists_written_with_prefixes_and_backslashes_fill_val_and_test(quirky):
    splits, report = load_folder(quirky, preload=True)
    val = {c.rel for c in splits["val"].clips if c.word != BACKGROUND_NOISE_DIR}
    test = {c.rel for c in splits["test"].clips if c.word != BACKGROUND_NOISE_DIR}
    assert val == {"yes/bb22_nohash_0.wav"} and test == {"no/dd44_nohash_0.wav"}
    assert report.lists.stats["val"]["unmatched"] == 1 and report.lists.stats["test"]["skipped_files"] == 1
    assert report.lists.stats["test"]["encoding"] == "utf-16"
    assert np.isfinite(np.stack([splits[s].waveforms.numpy() for s in ("val", "test")][0])).all()
    for s in splits.values():  # every loaded waveform is finite: no NaN noise window in any split
        assert s.waveforms is not None and bool(np.isfinite(s.waveforms.numpy()).all())


def test_empty_splits_and_unmatched_entries_are_reported_with_numbers(tmp_path):
    root = good_folder(tmp_path / "sc")
    (root / "validation_list.txt").write_text("elsewhere/x.wav\nyes/nope.wav\n")
    report = describe(root)
    warnings = "\n".join(report.warnings)
    assert "val split is empty: validation_list.txt has 2 entries: 0 match a clip" in warnings
    assert "2 match nothing" in warnings
    assert "test split is empty: the folder has other list files but no testing_list.txt" in warnings
    assert len(report.as_dict()["unmatched_list_entries"]) == 2


def test_too_few_speakers_for_a_speaker_split_is_reported(tmp_path):
    root = tmp_path / "sc"
    (root / "yes").mkdir(parents=True)
    sf.write(root / "yes" / "aa11_nohash_0.wav", TONE, 16000)
    report = describe(root)
    assert any(w.startswith("val split is empty: 1 speakers are too few") for w in report.warnings)


def test_data_info_json_is_one_object_with_the_interface_fields(quirky):
    result = CliRunner().invoke(app, ["data", "info", str(quirky), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert {"splits", "skipped", "unmatched_list_entries"} <= set(facts)
    assert all(facts["splits"][s]["clips"] >= 1 for s in ("train", "val", "test"))
    skipped = {s["path"].removeprefix(f"{quirky}/"): s["reason"] for s in facts["skipped"]}
    assert set(skipped) == set(BAD)
    assert [e["entry"] for e in facts["unmatched_list_entries"]] == ["./yes/zz00_nohash_0.wav"]
    assert "._aa11" not in json.dumps(facts["splits"]) and facts["ignored_files"]["hidden"] == 2
    assert sum(facts["splits"][s]["clips"] for s in facts["splits"]) == 6 + 3


def test_data_info_table_shows_the_same_facts_and_strict_fails_naming_the_file(quirky):
    result = CliRunner().invoke(app, ["data", "info", str(quirky)])
    assert result.exit_code == 0, result.output
    for fact in ("official lists", "validation_list.txt 1/2 matched", "skipped 6 bad audio files",
                 "gg77_nohash_0.wav", "1 list entries match no clip", "zz00_nohash_0.wav", "2 hidden"):
        assert fact in result.output, fact
    strict = CliRunner().invoke(app, ["data", "info", str(quirky), "--strict"])
    said = strict.output.replace("\n", "")  # the error line may wrap
    assert strict.exit_code == 1 and f"{BACKGROUND_NOISE_DIR}/white.wav#2: non-finite" in said  # first in scan order


def test_train_and_eval_strict_stop_naming_the_file_and_default_loads_report_skips(quirky, tmp_path, capsys):
    from ldfleet.commands.data import load_data
    from ldfleet.common.model.backbone import load_backbone
    from ldfleet.common.model.checkpoint import save_model
    from ldfleet.common.model.dynamic import DynamicModel
    from ldfleet.common.model.heads import with_head

    train = CliRunner().invoke(app, ["train", "--data", str(quirky), "--out", str(tmp_path / "run"), "--strict"])
    assert train.exit_code != 0 and "white.wav#2: non-finite" in train.output.replace("\n", "")
    assert not (tmp_path / "run").exists()  # stopped before any training
    save_model(DynamicModel(*with_head(load_backbone("tiny"))), tmp_path / "tiny-run")
    evaluate = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "tiny-run"), "--data", str(quirky), "--strict"])
    assert evaluate.exit_code != 0 and "white.wav#2: non-finite" in evaluate.output.replace("\n", "")
    splits = load_data(quirky, seed=0)
    said = capsys.readouterr().err.replace("\n", "")
    assert len(splits["val"]) >= 1 and "6 bad audio files/windows skipped" in said and "gg77_nohash_0.wav" in said


def test_client_strict_refuses_to_start_a_device_on_a_bad_folder(quirky, tmp_path):
    # Nothing is started (no agent, no SuperNode): the folder is checked first and the bad file named.
    result = CliRunner().invoke(app, ["client", "--device-id", "d1", "--device-class", "rpi4",
                                      "--superlink", "127.0.0.1:1", "--insecure", "--model", str(tmp_path / "model"),
                                      "--data", str(quirky), "--state-dir", str(tmp_path / "state"), "--strict"])
    assert result.exit_code == 2 and "--strict:" in result.output and "white.wav#2: non-finite" in result.output
    assert not (tmp_path / "state").exists()
