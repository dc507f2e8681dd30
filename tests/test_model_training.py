"""Training, resuming and evaluating through the CLI on a small real espeak-ng corpus."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ldfleet.cli import app
from ldfleet.common.data.folder import load_splits
from ldfleet.common.data.synth import SynthConfig, synthesize_corpus
from ldfleet.common.train import DEFAULT_DEPTH_CLIPS, DEFAULT_JOINT_EPOCHS, TrainConfig
from ldfleet.common.trainer import STRATEGY_STAGES, Trainer, depth_clips_for, joint_epochs_for

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 speakers x (10 keywords + 2 unknown) + 8 silence clips: ~150 clips in a few seconds."""
    out = tmp_path_factory.mktemp("kws") / "corpus"
    synthesize_corpus(
        SynthConfig(out=out, voices=("en-us", "en-gb", "en-029"), variants=("m3", "f2", "klatt", "f5"),
                    variants_per_voice=4, clips_per_word=1, unknown_words=("bed", "cat"), unknown_per_speaker=2,
                    silence_clips=8, workers=2),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "r"
    result = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(run), "--epochs", "6",
                                 "--strategy-epochs", "1", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    return run


def test_train_writes_a_complete_run_that_learned(trained_run):
    state = json.loads((trained_run / "train_state.json").read_text())
    assert state["done"] is True
    stages = [h["stage"] for h in state["history"]]
    assert stages == ["backbone"] * 6 + ["early_exit", "static", "selector"]
    assert (trained_run / "model.safetensors").stat().st_size > 100_000
    backbone = [h for h in state["history"] if h["stage"] == "backbone"]
    assert backbone[-1]["loss"] < backbone[0]["loss"]  # 12 classes: chance loss is ~2.5
    assert backbone[-1]["train_accuracy"] > 2 / 12
    selector = state["history"][-1]
    assert len(selector["layer_usage"]) == 8


def test_eval_split_all_scores_every_clip_of_the_folder(trained_run, corpus):
    """--split all: every clip of --data (a corpus the run was not trained on), not only its test speakers."""
    counts = {}
    for split in ("test", "all"):
        result = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--keep", "0.5",
                                     "--methods", "full", "--split", split, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["run"], report["split"], report["limit"]) == (str(trained_run), split, None)
        counts[split] = report["rows"][0]["examples"]
    splits = load_splits(corpus, seed=0)
    assert counts["all"] == sum(len(ds) for ds in splits.values()) > counts["test"] == len(splits["test"])
    bad = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--split", "everything"])
    assert bad.exit_code == 2 and "--split must be train, val, test or all" in bad.output


def test_eval_json_rows_cover_every_method_and_budget(trained_run, corpus):
    result = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--keep", "0.25,0.5",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert "no adaptive rows" in result.stderr and "no confident_exit rows" in result.stderr  # kws has no stage 4 by default: said, not an error
    out = json.loads(result.stdout)
    rows = {(r["method"], r["keep"]): r for r in out["rows"]}
    methods = ("random", "early_exit", "static", "selector", "oracle", "oracle_static")
    assert set(rows) == {("full", 1.0)} | {(m, k) for m in methods for k in (0.25, 0.5)}
    for (method, keep), r in rows.items():
        assert r["mean_layers"] == (8 if method == "full" else r["k"])
        assert 0.0 <= r["accuracy"] <= 1.0 and (r["ms_per_example"] is None if method.startswith("oracle") else r["ms_per_example"] > 0)
    for k in (0.25, 0.5):  # per-input best of the same candidate sets can only be as good or better
        assert rows[("oracle", k)]["accuracy"] >= rows[("oracle_static", k)]["accuracy"]
    assert rows[("early_exit", 0.25)]["macs"] < rows[("early_exit", 0.5)]["macs"] < rows[("full", 1.0)]["macs"]
    # the selector pays for itself in MACs, but only by its own tiny cost
    extra = rows[("selector", 0.5)]["macs"] - rows[("early_exit", 0.5)]["macs"]
    assert 0 < extra < 0.01 * rows[("full", 1.0)]["macs"]
    usage = out["layer_usage"]["selector"]
    assert sum(usage["0.25"]) == pytest.approx(2.0) and sum(usage["0.5"]) == pytest.approx(4.0)


def test_eval_table_and_bad_input(trained_run, corpus, tmp_path):
    table = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--keep", "0.5",
                                "--methods", "selector"])
    assert table.exit_code == 0 and "selector" in table.output and "share of inputs" in table.output
    limited = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--keep", "1.0",
                                  "--methods", "full", "--limit", "5", "--json"])
    assert limited.exit_code == 0 and [r["examples"] for r in json.loads(limited.stdout)["rows"]] == [5]
    bad_keep = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--keep", "1.5"])
    assert bad_keep.exit_code != 0 and "keep ratios must be in (0, 1]" in bad_keep.output
    unfitted = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--methods", "adaptive"])
    assert unfitted.exit_code == 2 and "--depth-clips" in unfitted.output
    uncalibrated = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--methods", "confident_exit"])
    assert uncalibrated.exit_code == 2 and "no fitted confident_exit" in uncalibrated.output
    bad_method = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(corpus), "--methods", "bogus"])
    assert bad_method.exit_code != 0 and "unknown methods" in bad_method.output
    no_run = runner.invoke(app, ["eval", "--run", str(tmp_path / "nope"), "--data", str(corpus)])
    assert no_run.exit_code == 2 and "ldfleet train" in no_run.output
    no_data = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert no_data.exit_code == 2 and "cannot load data" in no_data.output


def test_interrupted_training_resumes_without_repeating_epochs(corpus, tmp_path):
    splits = load_splits(corpus)
    cfg = TrainConfig(epochs=2, strategy_epochs=1, batch_size=16)

    def interrupt_in_static(stage, step, total):
        if stage == "static":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tmp_path, splits["train"], splits["val"], cfg).fit(interrupt_in_static)
    state = json.loads((tmp_path / "train_state.json").read_text())
    # early_exit finished and was saved; static had not completed an epoch
    assert (state["stage"], state["epoch"], state["done"]) == ("early_exit", 1, False)
    resumed = Trainer(tmp_path, splits["train"], splits["val"], cfg)
    final = resumed.fit()
    assert final.done
    assert [h["stage"] for h in final.history] == ["backbone", "backbone", *STRATEGY_STAGES]

    # with --set-table, interrupted in static's head epoch (its fit saved): the fit is not repeated
    table_cfg = TrainConfig(epochs=2, strategy_epochs=1, batch_size=16, set_table=12, selector_budget=True)
    table_run = tmp_path / "table"
    with pytest.raises(KeyboardInterrupt):
        Trainer(table_run, splits["train"], splits["val"], table_cfg).fit(interrupt_in_static)
    state = json.loads((table_run / "train_state.json").read_text())
    assert (state["stage"], state["epoch"]) == ("static", 0)
    assert [h.get("fit") for h in state["history"] if h["stage"] == "static"] == ["set_table"]
    final = Trainer(table_run, splits["train"], splits["val"], table_cfg).fit()
    for name in ("static", "selector"):
        assert [h.get("fit") for h in final.history if h["stage"] == name] == ["set_table", None]


def test_joint_stage_tunes_the_encoder_layers_for_every_strategy(trained_run, corpus, tmp_path):
    """`--joint-epochs` on a finished run adds stage 3: the encoder layers and every head change, the front
    end and the scorers do not, and an interrupted joint epoch resumes without repeating the others."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "joint"
    shutil.copytree(trained_run, run)
    splits = load_splits(corpus)
    cfg = TrainConfig(epochs=6, strategy_epochs=1, batch_size=16, joint_epochs=2)

    def interrupt_in_second_joint_epoch(stage, step, total):
        if stage == "joint" and trainer.state.epoch == 1:
            raise KeyboardInterrupt

    trainer = Trainer(run, splits["train"], splits["val"], cfg)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(interrupt_in_second_joint_epoch)
    state = json.loads((run / "train_state.json").read_text())
    assert (state["stage"], state["epoch"], state["done"]) == ("joint", 1, False)
    assert json.loads((run / "train_config.json").read_text())["joint_epochs"] == 2  # recorded for later re-runs
    final = Trainer(run, splits["train"], splits["val"], cfg).fit()
    assert [h["stage"] for h in final.history] == ["backbone"] * 6 + list(STRATEGY_STAGES) + ["joint"] * 2
    joint = final.history[-1]
    assert all(joint[f"loss_{name}"] > 0 for name in ("random", "early_exit", "static", "selector"))
    assert 0.0 <= joint["val_accuracy"] <= 1.0 and 0.0 <= joint["val_full_accuracy"] <= 1.0

    before, after = load_file(str(trained_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    layers = {key for key in before if ".encoder.layers." in key}
    assert layers and changed & layers  # the encoder layers learned
    front_end = {key for key in before if any(part in key for part in ("feature_extractor", "feature_projection", "pos_conv_embed"))}
    assert front_end and not changed & front_end  # cached, hence frozen
    scorers = {key for key in before if key.startswith("strategies.")}
    assert scorers and not changed & scorers  # the sets are the ones stage 2 chose
    for head in ("base", "early_exit", "static", "selector"):
        assert any(key.startswith(f"heads.{head}.") for key in changed), head
    # through the API too, a re-run that does not name joint_epochs keeps the run's own: nothing is added
    again = Trainer(run, splits["train"], splits["val"], TrainConfig(epochs=6, strategy_epochs=1, batch_size=16)).fit()
    assert again.history == final.history


def test_stage_3_defaults_to_the_task_for_a_new_run_and_to_the_run_for_a_resumed_one():
    assert joint_epochs_for(TrainConfig(task="asr")) == DEFAULT_JOINT_EPOCHS["asr"] > 0
    assert joint_epochs_for(TrainConfig(task="kws")) == DEFAULT_JOINT_EPOCHS["kws"] == 0
    assert joint_epochs_for(TrainConfig(task="asr", from_run="elsewhere")) == 0  # stage 2 on the source's encoder as it is
    assert joint_epochs_for(TrainConfig(task="asr"), saved={"task": "asr"}) == 0  # a run from before stage 3
    assert joint_epochs_for(TrainConfig(task="asr"), saved={"joint_epochs": 3}) == 3
    assert joint_epochs_for(TrainConfig(task="asr", joint_epochs=1), saved={"joint_epochs": 3}) == 1  # asked for


def test_stage_4_defaults_to_the_task_for_a_new_or_older_run_and_to_the_run_for_a_resumed_one():
    assert depth_clips_for(TrainConfig(task="asr")) == DEFAULT_DEPTH_CLIPS["asr"] > 0
    assert depth_clips_for(TrainConfig(task="kws")) == DEFAULT_DEPTH_CLIPS["kws"] == 0
    assert depth_clips_for(TrainConfig(task="asr"), saved={"task": "asr"}) == DEFAULT_DEPTH_CLIPS["asr"]  # before stage 4
    assert depth_clips_for(TrainConfig(task="asr"), saved={"depth_clips": 0}) == 0  # a run trained without it stays so
    assert depth_clips_for(TrainConfig(task="kws"), saved={"depth_clips": 64}) == 64
    assert depth_clips_for(TrainConfig(task="asr", depth_clips=8), saved={"depth_clips": 0}) == 8  # asked for


def test_from_run_trains_only_the_strategies_on_the_same_encoder(trained_run, corpus, tmp_path):
    """`--from-run` reuses a finished stage 1: same encoder and base head, new stage-2 options."""
    import torch
    from safetensors.torch import load_file

    from ldfleet.common.model.checkpoint import load_model

    out = tmp_path / "budget"
    result = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), "--from-run", str(trained_run),
                                 "--strategy-epochs", "1", "--batch-size", "16", "--selector-budget"])
    assert result.exit_code == 0, result.output
    state = json.loads((out / "train_state.json").read_text())
    assert [h["stage"] for h in state["history"]] == ["backbone"] * 6 + list(STRATEGY_STAGES)
    again = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(out), "--from-run", str(tmp_path / "moved")])
    assert again.exit_code == 0 and "resuming" in again.output  # a resumed run no longer needs its source
    before, after = load_file(str(trained_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("runner.", "heads.base."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    model = load_model(out)  # the budget-conditioned selector and per-k static ranking reload
    assert model.selector_budget and model.static_budget
    assert model.strategy("static").scorer.scores.shape == (model.num_layers + 1, model.num_layers)
    from ldfleet.common.model.export import export_onnx

    manifest = export_onnx(out, tmp_path / "onnx", int8=False)  # a budget selector: one selector graph per k
    assert manifest["graphs"]["fp32"]["selector"] == [f"selector_k{k:02d}.onnx" for k in range(1, model.num_layers)]
    assert manifest["max_abs_diff_fp32"] <= 1e-4 and manifest["task"] == "kws"

    table = tmp_path / "table"
    fitted = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(table), "--from-run", str(trained_run),
                                 "--strategy-epochs", "1", "--batch-size", "16", "--set-table", "24", "--selector-budget"])
    assert fitted.exit_code == 0, fitted.output
    history = json.loads((table / "train_state.json").read_text())["history"]
    fitted_model = load_model(table)
    head_state = fitted_model.heads["base"].state_dict()
    for name in ("static", "selector"):
        # the fit, then one epoch that trains only the head, on the fitted sets
        assert [h.get("fit") for h in history if h["stage"] == name] == ["set_table", None]
        tuned = fitted_model.heads[name].state_dict()
        assert not all(torch.equal(tuned[key], head_state[key]) for key in head_state)
    base_heads = tmp_path / "table-base-heads"  # --strategy-epochs 0: the fit only, heads stay the base head
    fitted = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(base_heads), "--from-run", str(trained_run),
                                 "--strategy-epochs", "0", "--set-table", "24", "--selector-budget"])
    assert fitted.exit_code == 0, fitted.output
    untuned = load_model(base_heads)
    for name in ("static", "selector"):
        kept = untuned.heads[name].state_dict()
        assert all(torch.equal(kept[key], head_state[key]) for key in head_state)
    assert torch.equal(untuned.strategy("static").scorer.scores, fitted_model.strategy("static").scorer.scores)
    # static keeps, per k, the set with the lowest mean loss on the training table (same clips: seed 0;
    # the table uses the base head, which is unchanged), through the head's epoch
    from ldfleet.common.model.selector import topk_mask
    from ldfleet.common.set_fit import chosen_loss, set_loss_table
    from ldfleet.common.front_cache import cache_front_ends

    splits = load_splits(corpus)
    train_cache, val_cache = cache_front_ends(fitted_model, splits["train"]), cache_front_ends(fitted_model, splits["val"])
    rows = torch.randperm(len(train_cache), generator=torch.Generator().manual_seed(0))[:24]
    train_table = set_loss_table(fitted_model, train_cache, rows)
    assert set(train_table.losses) == set(range(1, fitted_model.num_layers))
    static = fitted_model.strategy("static").scorer
    for k, losses in train_table.losses.items():
        assert torch.equal(topk_mask(static.for_batch(1, k), k)[0], train_table.sets[k][int(losses.mean(0).argmin())])
    # the selector, started from those sets, still loses less than the average set on validation clips
    val_table = set_loss_table(fitted_model, val_cache, torch.arange(min(12, len(val_cache))))
    selector = fitted_model.strategy("selector").scorer
    chosen = chosen_loss(lambda k: selector.from_pooled(val_table.pooled, k), val_table)
    assert sum(chosen.values()) < sum(float(v.mean()) for v in val_table.losses.values())

    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run, unfinished)
    (unfinished / "train_state.json").write_text(json.dumps({"stage": "backbone", "epoch": 2, "history": []}))
    again = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / "x"), "--from-run", str(unfinished)])
    assert again.exit_code != 0 and "stage 1 is unfinished" in again.output
    not_a_run = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / "y"), "--from-run", str(corpus)])
    assert not_a_run.exit_code == 2 and "not a run made by `ldfleet train`" in not_a_run.output
    damaged = tmp_path / "damaged"  # progress cut short by a full disk: refused, naming the source
    shutil.copytree(trained_run, damaged)
    (damaged / "train_state.json").write_text('{"stage": "sel')
    refused = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / "z"), "--from-run", str(damaged)])
    assert refused.exit_code == 2 and f"{damaged} is not a usable run" in refused.output
    assert not (tmp_path / "z" / "train_config.json").exists()  # refused before anything was written
    for name, damage in (("no-weights", lambda f: f.unlink()), ("cut-weights", lambda f: f.write_bytes(f.read_bytes()[:1000]))):
        source = tmp_path / name
        shutil.copytree(trained_run, source)
        damage(source / "model.safetensors")
        refused = runner.invoke(app, ["train", "--data", str(corpus), "--out", str(tmp_path / f"out-{name}"), "--from-run", str(source)])
        assert refused.exit_code == 2 and "its model cannot be loaded" in refused.output, refused.output


def test_keyword_head_on_a_whisper_encoder_trains_evaluates_and_infers(corpus, tmp_path):
    """Whisper is a backbone family like the others: a keyword head on its encoder (no decoder) goes
    through train, eval (with MACs of Whisper's log-mel front end) and infer."""
    from whisper_fixtures import tiny_whisper

    tiny_whisper().save_pretrained(tmp_path / "whisper")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--backbone", str(tmp_path / "whisper"), "--data", str(corpus), "--out", str(run),
                                 "--epochs", "1", "--strategy-epochs", "1", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(corpus), "--keep", "0.5",
                                 "--methods", "full,selector,random", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["keep"]): r for r in json.loads(result.output)["rows"]}
    assert set(rows) == {("full", 1.0), ("selector", 0.5), ("random", 0.5)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert 0 < rows[("random", 0.5)]["macs"] < rows[("selector", 0.5)]["macs"] < rows[("full", 1.0)]["macs"]
    wav = next((corpus / "yes").glob("*.wav"))
    result = runner.invoke(app, ["infer", "--run", str(run), "--keep", "0.5", str(wav)])
    assert result.exit_code == 0, result.output
