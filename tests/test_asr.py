"""Speech recognition: text normaliser + jiwer scores, CTC head, transcribed-data readers, the
espeak-ng phrase corpus, and a tiny train -> eval round trip (real espeak-ng, real WavLM classes)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ldfleet.common.data.labels import LABELS, SPEECH_COMMANDS_V2, UNKNOWN, label_for, resolve_label_set
from ldfleet.common.data.loading import pad_batch
from ldfleet.common.data.transcribed import load_transcribed_splits, read_manifest, scan_transcribed
from ldfleet.common.metrics import normalize_text, score
from ldfleet.common.model.heads import CharVocab, ClassificationHead, CTCHead, WordVocab, choose_vocab, head_from_spec
from ldfleet.common.train import DEFAULT_JOINT_EPOCHS

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


def test_one_normaliser_for_targets_and_scores():
    assert normalize_text("  Turn ON, the\tlight!  ") == "turn on the light"
    assert normalize_text("Don't dial 911.") == "don't dial 911"
    assert normalize_text("Don\u2019t say \u2018hi\u2019 or 'yo'") == "don't say hi or yo"  # typographic apostrophes; quotes dropped
    assert score("asr", ["don't stop"], ["Don\u2019t stop"]) == {"wer": 0.0, "cer": 0.0}
    # vowel signs and points are marks, not punctuation: a Hindi or Thai word stays one word
    assert normalize_text("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e").split() == [
        "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0926\u0941\u0928\u093f\u092f\u093e"]
    assert len(normalize_text("\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a").split()) == 1
    s = score("asr", ["turn on the light", "call bob"], ["Turn on the LIGHT.", "call alice"])
    assert s["wer"] == pytest.approx(1 / 6) and s["cer"] == pytest.approx(5 / 27)  # bob -> alice: 5 edits
    assert score("kws", ["yes", "no"], ["yes", "yes"]) == {"accuracy": 0.5}
    with pytest.raises(ValueError):
        score("nope", [], [])


def test_ctc_head_targets_loss_greedy_decoding_and_spec():
    vocab = CharVocab.from_texts(["call bob", "dial 42"])
    assert "4" in vocab.tokens and vocab.decode(vocab.encode("Call Bob!")) == "call bob"
    head = CTCHead(16, vocab)
    t = head.targets(["call bob", "hi"])
    assert t.ids.shape == (2, 8) and t.lengths.tolist() == [8, 2] and int(t.ids[1, 2]) == -100
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    loss = head.loss(hidden, mask, t)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad is not None and hidden.grad[1, 20:].abs().sum() == 0
    # greedy decoding collapses repeats and drops blanks: "aa-ab" -> "aab" needs the blank between
    ids = [vocab.index[c] for c in "hh"] + [0] + [vocab.index["h"], vocab.index["|"], vocab.index["o"]]
    logits = torch.nn.functional.one_hot(torch.tensor([ids]), len(vocab)).float()
    assert head.decode(logits, None) == ["hh o"]
    rebuilt = head_from_spec(json.loads(json.dumps(head.spec())), 16)
    assert isinstance(rebuilt, CTCHead) and rebuilt.vocab.tokens == vocab.tokens


def test_word_units_for_a_closed_vocabulary():
    """A word head: one unit per training word, unknown words as <unk>, decoding with spaces, its
    spec round-trips; runs saved before word units load with characters."""
    closed = ["call bob", "dial one two", "call alice"]
    vocab = choose_vocab(closed, "word")
    assert isinstance(vocab, WordVocab) and vocab.tokens[:2] == ["<blank>", "<unk>"] and len(vocab) == 8
    assert vocab.decode(vocab.encode("Call BOB, dial two!")) == "call bob dial two"
    assert vocab.decode(vocab.encode("call carol")) == "call <unk>"
    assert isinstance(choose_vocab(closed), CharVocab)
    with pytest.raises(ValueError, match="unknown token unit"):
        choose_vocab(closed, "phoneme")
    head = CTCHead(16, vocab)
    t = head.targets(["dial one two", "bob"])
    assert t.lengths.tolist() == [3, 1]
    ids = [vocab.index["dial"], vocab.index["dial"], 0, vocab.index["one"], 0, vocab.index["one"]]
    logits = torch.nn.functional.one_hot(torch.tensor([ids]), len(vocab)).float()
    assert head.decode(logits, None) == ["dial one one"]
    rebuilt = head_from_spec(json.loads(json.dumps(head.spec())), 16)
    assert isinstance(rebuilt.vocab, WordVocab) and rebuilt.vocab.tokens == vocab.tokens
    legacy = {"type": "ctc", "vocab": CharVocab().tokens[2:]}  # a run saved before word units
    assert isinstance(head_from_spec(legacy, 16).vocab, CharVocab)


def test_label_sets_any_words():
    assert resolve_label_set("keywords") == LABELS and len(resolve_label_set("speech-commands-35")) == 35
    folder = resolve_label_set("folder", ["yes", "no", "_unknown_", "_background_noise_"])
    assert folder == ("no", "yes", "_unknown_", "_silence_")
    explicit = resolve_label_set("cat,dog")
    assert label_for("cat", False, explicit) == "cat" and label_for("bird", False, explicit) is None
    assert label_for("bird", False, ("cat", UNKNOWN)) == UNKNOWN and label_for("", True, explicit) is None
    assert set(SPEECH_COMMANDS_V2) >= set(LABELS[:10])
    with pytest.raises(ValueError):
        resolve_label_set("cat,cat")
    with pytest.raises(ValueError, match=r"label\(s\) \['yes'\] listed more than once"):
        resolve_label_set("yes,yes,no")
    head = ClassificationHead(8, explicit)
    assert head.targets(["dog", "cat"]).ids.tolist() == [1, 0]
    with pytest.raises(ValueError, match="not in the head's label set"):
        head.targets(["bird"])


def _wav(path: Path, seconds: float, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(seed).uniform(-0.1, 0.1, int(seconds * 16000)).astype(np.float32), 16000)


def test_audiofolder_and_manifest_readers(tmp_path):
    root = tmp_path / "af"
    rows = [("a/1.wav", "Yes please", "s1"), ("a/2.wav", "no", "s1"), ("b/3.wav", "stop", "s2"), ("c/4.wav", "go", "s3")]
    for i, (name, _, _) in enumerate(rows):
        _wav(root / name, 0.5 + 0.25 * i, i)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "transcription", "speaker"])
        w.writerows(rows)
    splits = load_transcribed_splits(root, seed=0, fractions=(0.34, 0.33, 0.33))
    by_split = {s: set(ds.speakers) for s, ds in splits.items()}
    assert sum(len(ds) for ds in splits.values()) == 4 and all(by_split.values())
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    waves, mask, texts = pad_batch([splits["train"][i] for i in range(len(splits["train"]))])
    assert mask is None or mask.sum(1).tolist() == [len(splits["train"][i][0]) for i in range(len(texts))]

    manifest = tmp_path / "m" / "train.jsonl"
    manifest.parent.mkdir()
    _wav(manifest.parent / "x.wav", 1.0)
    manifest.write_text(json.dumps({"audio_filepath": "x.wav", "text": "call bob", "duration": 1.0, "split": "dev"}) + "\n\n")
    [item] = read_manifest(manifest)
    assert item.text == "call bob" and item.split == "val" and item.meta["duration"] == "1.0"
    assert scan_transcribed(manifest)[0].path == manifest.parent / "x.wav"
    manifest.write_text('{"audio_filepath": "missing.wav", "text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no audio file"):
        read_manifest(manifest)
    (root / "metadata.csv").write_text("file_name,words\na/1.wav,yes\n")
    with pytest.raises(ValueError, match="transcription"):
        scan_transcribed(root)


def test_data_info_checks_an_audiofolder_and_train_refuses_a_split_left_empty(tmp_path):
    """`data info --json` on an audiofolder (every file decoded, empty splits warned about), and `train`
    refusing, before any work, a corpus whose speakers all fell into train."""
    from typer.testing import CliRunner

    from ldfleet.cli import app

    root = tmp_path / "af"
    rows = [("a.wav", "press one", "s1", "train"), ("b.wav", "call home", "s2", "train"), ("c.wav", "stop", "s3", "test")]
    for name, *_ in rows:
        _wav(root / name, 0.8)
    (root / "bad.wav").write_bytes(b"RIFF not audio")
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "transcription", "speaker", "split"), *rows, ("bad.wav", "go", "s4", "test")])
    cli = CliRunner()
    out = cli.invoke(app, ["data", "info", str(root), "--json"])
    assert out.exit_code == 0, out.output
    facts = json.loads(out.stdout)
    counts = {split: {k: v for k, v in f.items() if k in ("utterances", "speakers", "words")} for split, f in facts["splits"].items()}
    assert counts == {"train": {"utterances": 2, "speakers": 2, "words": 4}, "val": {"utterances": 0, "speakers": 0, "words": 0},
                      "test": {"utterances": 1, "speakers": 1, "words": 1}}
    assert facts["splits"]["train"]["seconds"] == pytest.approx(1.6) and facts["splits"]["test"]["longest_s"] == pytest.approx(0.8)
    assert [s["path"].endswith("bad.wav") for s in facts["skipped"]] == [True] and "val split is empty" in facts["warnings"][0]
    strict = cli.invoke(app, ["data", "info", str(root), "--strict"])
    assert strict.exit_code == 1 and "bad.wav" in strict.output
    train = cli.invoke(app, ["train", "--task", "asr", "--data", str(root), "--out", str(tmp_path / "run")])
    assert train.exit_code != 0 and "has no val clips" in train.output and not (tmp_path / "run").exists()


def test_telephone_band_limits_and_reverb_lengthens():
    from ldfleet.common.data.synth_asr import reverb, telephone

    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(telephone(noise))) ** 2
    freqs = np.fft.rfftfreq(16000, 1 / 16000)
    assert spectrum[freqs > 4500].sum() < 0.01 * spectrum[(freqs > 500) & (freqs < 3000)].sum()
    wet = reverb(noise[:4000], np.random.default_rng(1))
    assert len(wet) > 4000 and np.abs(wet).max() == pytest.approx(np.abs(noise[:4000]).max(), rel=1e-4)


@pytest.fixture(scope="module")
def asr_corpus(tmp_path_factory):
    from ldfleet.common.data.synth_asr import AsrSynthConfig, synthesize_asr_corpus

    out = tmp_path_factory.mktemp("asr") / "c"
    cfg = AsrSynthConfig(out=out, voices=("en-us", "de"), variants=("m3", "f2", "klatt"), variants_per_voice=3,
                         utterances_per_speaker=3, workers=2)
    return out, cfg, synthesize_asr_corpus(cfg, progress=False)


@needs_espeak
def test_synth_says_how_many_variants_fill_every_split(tmp_path):
    """Speakers are split within each voice: with 2 variants a voice has no validation or test
    speaker however many voices there are, and the warning says what to change."""
    from typer.testing import CliRunner

    from ldfleet.cli import app

    from ldfleet.common.data.espeak import ACCENT_VOICES, ENGLISH_VOICES

    out = CliRunner().invoke(app, ["data", "synth", "--task", "asr", "--out", str(tmp_path / "c"), "--voices", "9",
                                   "--variants-per-voice", "2", "--utterances-per-speaker", "1"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0, out.output
    assert "no speaker in" in text and "--variants-per-voice 3 or more (now 2)" in text and "--voices" not in text
    # a count takes the English voices, then the accents, as a scenario's asr_corpus.voices does
    with open(tmp_path / "c" / "metadata.csv", newline="") as f:
        voices = {r["voice"] for r in csv.DictReader(f)}
    assert voices == set(ENGLISH_VOICES + ACCENT_VOICES[:1])


@needs_espeak
def test_asr_corpus_is_an_audiofolder_with_speaker_disjoint_splits(asr_corpus, tmp_path):
    from dataclasses import replace

    from ldfleet.common.data.synth_asr import synthesize_asr_corpus

    out, cfg, summary = asr_corpus
    assert summary.utterances == 18 and not summary.failures
    with open(out / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:3] == ["file_name", "transcription", "speaker"]
        rows = list(reader)
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    speakers = {}
    for r in rows:
        speakers.setdefault(r["speaker"], set()).add(r["split"])
        assert len(r["transcription"].split()) >= 2 and sf.info(str(out / r["file_name"])).samplerate == 16000
    assert all(len(s) == 1 for s in speakers.values())
    again = synthesize_asr_corpus(replace(cfg, out=tmp_path / "again"), progress=False)
    assert again.utterances == summary.utterances
    assert all((out / r["file_name"]).read_bytes() == (tmp_path / "again" / r["file_name"]).read_bytes() for r in rows)


@needs_espeak
def test_tiny_asr_train_then_eval_through_the_cli(asr_corpus, tmp_path):
    """`train --task asr` (with every selector option on) then `eval --json`: rows for every method."""
    from typer.testing import CliRunner

    from ldfleet.cli import app
    from ldfleet.common.model.checkpoint import load_model

    out, _, _ = asr_corpus
    run = tmp_path / "run"
    cli = CliRunner()
    trained = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(run), "--epochs", "1",
                               "--strategy-epochs", "1", "--batch-size", "4", "--distill", "0.5", "--selector-budget",
                               "--oracle-weight", "0.5", "--set-table", "0", "--joint-epochs", "1"])
    assert trained.exit_code == 0, trained.output
    stage1 = [h["val_wer"] for h in json.loads((run / "train_state.json").read_text())["history"] if h["stage"] == "backbone"]
    assert ("transcribes almost nothing" in " ".join(trained.output.split())) == (stage1[-1] >= 0.98)  # the blank plateau
    model = load_model(run)
    assert model.task == "asr" and model.selector_budget and isinstance(model.heads["selector"], CTCHead)
    result = cli.invoke(app, ["eval", "--run", str(run), "--data", str(out), "--keep", "0.5,1.0", "--oracle-sets", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {(r["method"], r["keep"]): r for r in report["rows"]}
    for method in ("random", "early_exit", "static", "selector", "oracle", "oracle_static"):
        row = rows[(method, 0.5)]
        assert {"wer", "cer", "mean_layers", "ms_per_example", "distinct_sets"} <= set(row) and row["mean_layers"] == 4
    assert rows[("full", 1.0)]["mean_layers"] == 8 and 0 <= rows[("full", 1.0)]["wer"]
    # stage 4 (asr default) fitted the adaptive strategy's depth chooser: a depth per clip at a mean of k
    assert rows[("adaptive", 1.0)]["mean_layers"] == 8 and rows[("adaptive", 1.0)]["wer"] == rows[("selector", 1.0)]["wer"]
    assert rows[("adaptive", 0.5)]["mean_layers_timed"] > 0 and "adaptive" in report["usage_by_condition"]
    # ... and calibrated confident exit: the early-exit head, each clip stopping at its first confident exit
    assert rows[("confident_exit", 1.0)]["mean_layers"] == 8 and rows[("confident_exit", 1.0)]["wer"] == rows[("early_exit", 1.0)]["wer"]
    assert 1 <= rows[("confident_exit", 0.5)]["mean_layers"] <= 8 and rows[("confident_exit", 0.5)]["macs"] > 0
    for method in ("random", "static", "selector"):  # exactly k layers on every clip: the weighting changes nothing
        assert rows[(method, 0.5)]["mean_layers_timed"] == pytest.approx(4)
    assert rows[("oracle", 0.5)]["cer"] <= rows[("oracle_static", 0.5)]["cer"]
    (room,) = report["headroom"]
    best, oracle, sel = (rows[(m, 0.5)]["wer"] for m in ("oracle_static", "oracle", "selector"))
    assert room["keep"] == 0.5 and (room["best_single"], room["oracle"], room["selector"]) == (best, oracle, sel)
    if best > oracle:
        assert room["captured"] == pytest.approx((best - sel) / (best - oracle))
    channels = {r["channel"] for r in csv.DictReader(open(out / "metadata.csv")) if r["split"] == "test"}
    assert set(report["usage_by_condition"]["selector"]["0.5"]["channel"]) == channels
    assert "channel" in room["by_condition"] and all(v >= 0 for v in room["by_condition"].values())
    table = cli.invoke(app, ["eval", "--run", str(run), "--data", str(out), "--keep", "0.5", "--methods", "selector,oracle",
                             "--oracle-sets", "3"])
    assert table.exit_code == 0 and "wer" in table.output and "by condition" in table.output
    assert "input conditioning could win" in table.output and "best set per value of one condition" in table.output
    limited = cli.invoke(app, ["eval", "--run", str(run), "--data", str(out), "--keep", "1.0", "--methods", "full",
                               "--limit", "2", "--json"])
    assert limited.exit_code == 0 and "the first 2 of the 6 clips" in limited.output
    assert [r["examples"] for r in json.loads(limited.stdout)["rows"]] == [2] and rows[("full", 1.0)]["examples"] == 6
    history = json.loads((run / "train_state.json").read_text())["history"]
    assert [(h["stage"], h.get("fit")) for h in history][-3:] == [("joint", None), ("depth", "depth"), ("depth", "confident_exit")]
    assert len(history[-2]["lambdas"]) == 8 and history[-2]["clips"] == sum(
        r["split"] == "train" for r in csv.DictReader(open(out / "metadata.csv")))
    thresholds = history[-1]["exit_thresholds"]  # a bigger mean of layers: later exits, so a higher threshold
    assert len(thresholds) == 8 and thresholds == sorted(thresholds)
    again = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(run)])  # finished: nothing added
    assert again.exit_code == 0 and json.loads((run / "train_state.json").read_text())["history"] == history
    # the asr default fits static and selector on a layer-set table of CTC losses, then tunes their heads;
    # from a run, stage 3 (which would tune the encoder) runs only when asked for
    fitted = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(tmp_path / "table"),
                              "--from-run", str(run), "--strategy-epochs", "1", "--batch-size", "4"])
    assert fitted.exit_code == 0, fitted.output
    history = json.loads((tmp_path / "table" / "train_state.json").read_text())["history"]
    assert [h.get("fit") for h in history if h["stage"] == "selector"] == ["set_table", None]
    assert DEFAULT_JOINT_EPOCHS["asr"] > 0 and [h["stage"] for h in history].count("joint") == 1  # the source's
    (fit,) = [h for h in history if h["stage"] == "static" and h.get("fit")]  # CTC loss per token of the chosen sets
    assert sorted(map(int, fit["val_chosen_loss"])) == list(range(1, model.num_layers))
    assert all(0 < v < float("inf") for v in fit["val_chosen_loss"].values())
    # oracle supervision trains gate-learned scores: with table-fitted ones it is refused, before any work
    both = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(tmp_path / "both"),
                            "--set-table", "8", "--oracle-weight", "0.5"])
    assert both.exit_code == 2 and "give --set-table 0 with it" in both.output and not (tmp_path / "both").exists()
    # a finished run given one more joint epoch: the encoder changed, so the depth chooser is fitted again
    more = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(run), "--joint-epochs", "2"])
    assert more.exit_code == 0, more.output
    assert [h["stage"] for h in json.loads((run / "train_state.json").read_text())["history"]][-6:] == ["joint", "depth", "depth", "joint", "depth", "depth"]
    other_seed = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(run), "--seed", "3"])
    assert other_seed.exit_code == 2 and "give --seed 0 to resume it" in other_seed.output  # other splits: refused
    other_cap = cli.invoke(app, ["train", "--task", "asr", "--data", str(out), "--out", str(run), "--max-seconds", "2"])
    assert other_cap.exit_code == 2 and "give --max-seconds 0.0 to resume it" in other_cap.output  # other clips: refused


def test_best_set_per_group_picks_each_groups_own_best_candidate():
    from ldfleet.common.evaluate import best_set_per_group

    # 3 candidates x 5 inputs: candidate 1 is best for the noisy inputs, candidate 2 for the clean ones,
    # candidate 0 is the best single one overall
    errs = torch.tensor([[1., 1., 1., 1., 1.], [0., 0., 3., 3., 3.], [9., 9., 0., 0., 1.]])
    groups = ["noisy", "noisy", "clean", "clean", "clean"]
    assert best_set_per_group(errs, groups).tolist() == [1, 1, 2, 2, 2]
    assert best_set_per_group(errs, ["all"] * 5).tolist() == [0] * 5


def test_a_run_left_on_the_blank_plateau_is_warned_about():
    from ldfleet.commands._shared import err
    from ldfleet.commands.model import _warn_if_blank

    for history, warned in [([{"stage": "backbone", "val_wer": 0.9}, {"stage": "backbone", "val_wer": 1.0}], True),
                            ([{"stage": "backbone", "val_wer": 1.0}, {"stage": "backbone", "val_wer": 0.6}], False),
                            ([{"stage": "backbone", "val_accuracy": 0.1}], False)]:  # a keyword run
        with err.capture() as cap:
            _warn_if_blank(history)
        assert ("transcribes almost nothing" in cap.get()) == warned
