"""A speech-recognition (CTC) run on the device: ONNX export with one selector graph per k, transcripts
from torch and onnxruntime equal to evaluation's, `ldfleet infer` / `ldfleet serve` on whole
utterances, the governor planning for an input's duration, `bench runtime` rows with WER, and the
adaptive strategy (a depth per input) on the device."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from edge_fixtures import post_wav, tiny_asr_export, tiny_asr_run, tiny_export, tiny_run, utterance_folder  # noqa: F401 - fixtures
from ldfleet.cli import app
from ldfleet.client.governor import Governor
from ldfleet.client.infer import InferenceSession, PolicySource, clip_from_wav, input_from_wav, open_engine, utterance_from_wav
from ldfleet.client.serve import ServiceThread, build_app
from ldfleet.common.edge_runtime import EdgeModel, Result, ctc_decode
from ldfleet.common.model.heads import CharVocab, CTCHead, WordVocab

runner = CliRunner()


def test_export_writes_a_selector_graph_per_k_and_the_ctc_tokens(tiny_asr_run, tiny_asr_export):
    from ldfleet.common.model.checkpoint import load_model

    manifest = json.loads((tiny_asr_export / "manifest.json").read_text())
    vocab = load_model(tiny_asr_run).head_for("selector").vocab
    assert manifest["task"] == "asr" and manifest["ctc"] == {"unit": "char", "tokens": vocab.tokens}
    assert "labels" not in manifest
    assert manifest["graphs"]["fp32"]["selector"] == [f"selector_k{k:02d}.onnx" for k in range(1, 8)]
    assert all((tiny_asr_export / g).exists() for g in manifest["graphs"]["int8"]["selector"])
    assert manifest["max_abs_diff_fp32"] <= 1e-4  # CTC logits frame by frame, at every k and two lengths


@pytest.mark.parametrize("vocab", [CharVocab(), WordVocab(["press", "one", "two", "call"])])
def test_host_ctc_decoding_equals_the_torch_head(vocab):
    head = CTCHead(16, vocab)
    logits = torch.randn(4, 30, len(vocab))
    logits[:, ::3, 0] += 4.0  # blanks between tokens, repeats elsewhere
    tokens = list(vocab.tokens)
    assert ctc_decode(logits.numpy(), tokens, vocab.unit) == head.decode(logits, None)


def test_device_transcripts_equal_evaluations_at_every_k(tiny_asr_run, tiny_asr_export, utterance_folder):
    """Torch engine, onnxruntime fp32 and `DynamicModel.predict` (what `ldfleet eval` runs): the same
    layers and the same transcript, on whole utterances of different lengths."""
    torch_engine, edge = open_engine(tiny_asr_run, "torch"), EdgeModel(tiny_asr_export)
    model = torch_engine.model
    assert torch_engine.task == edge.task == "asr" and torch_engine.labels == []
    chosen = set()
    for path in sorted(utterance_folder.glob("*.wav")):
        wave = utterance_from_wav(path)
        assert len(wave) == len(sf.read(path)[0])  # the whole utterance: not trimmed to a 1 s clip
        with torch.inference_mode():
            front = model.front_end(torch.from_numpy(wave).unsqueeze(0))
        for k in range(1, 9):
            a, b = torch_engine.run(wave, k), edge.run(wave, k)
            with torch.inference_mode():
                (text,), keep = model.predict(front, "selector", k)
            assert a.layers == b.layers == keep[0].nonzero().flatten().tolist()
            assert a.prediction == b.prediction == text and text  # random weights: some characters
            chosen.add(tuple(a.layers))
    assert len(chosen) >= 8  # a set per k: the per-k selector graphs are not one ranking


def test_infer_cli_transcribes_utterances_on_torch_and_onnx(tiny_asr_run, tiny_asr_export, utterance_folder):
    args = ["--keep", "0.5", "--json", str(utterance_folder)]
    rows = {}
    for runtime, target in (("torch", tiny_asr_run), ("onnx", tiny_asr_export), ("onnx-int8", tiny_asr_export)):
        out = runner.invoke(app, ["infer", "--run", str(target), "--runtime", runtime, *args])
        assert out.exit_code == 0, out.output
        rows[runtime] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    engine = open_engine(tiny_asr_run, "torch")
    expected = [engine.run(utterance_from_wav(p), 4).prediction for p in sorted(utterance_folder.glob("*.wav"))]
    assert [r["prediction"] for r in rows["torch"]] == [r["prediction"] for r in rows["onnx"]] == expected
    assert [r["k"] for r in rows["onnx-int8"]] == [4, 4, 4] and all(len(r["layers"]) == 4 for r in rows["onnx-int8"])


def test_inputs_are_read_as_the_task_was_trained(utterance_folder, tmp_path):
    path = utterance_folder / "utt_2.wav"
    assert len(input_from_wav(path, "kws")) == 16000 and len(input_from_wav(path, "asr")) == int(3.7 * 16000)
    stereo = tmp_path / "stereo_32k.wav"
    sf.write(stereo, np.stack([sf.read(path)[0]] * 2, axis=1), 32000)  # 2 channels at twice the rate: 1.85 s
    assert len(utterance_from_wav(stereo)) == pytest.approx(int(3.7 * 16000) // 2, abs=2)
    broken = tmp_path / "nan.wav"
    sf.write(broken, np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 16000, subtype="FLOAT")
    for read in (clip_from_wav, utterance_from_wav):
        with pytest.raises(ValueError, match="non-finite"):
            read(broken)


def test_governor_plans_for_the_inputs_duration():
    """Estimates per second of audio: after 1 s requests, a 3 s utterance under the same deadline
    gets fewer layers, and the prediction scales with the duration."""
    gov = Governor(8, cpu=type("Idle", (), {"busy": 0.1, "share": 1.0, "sample": lambda self: 0.1})(), battery=lambda: None)
    for _ in range(5):  # 1 s inputs: front end 4 ms, 2 ms per layer, 0.5 ms besides
        gov.observe(Result("", 8, list(range(8)), 4 + 16 + 0.5, 4.0, 0.1, [2.0] * 8, 0.4), seconds=1.0)
    assert gov.predict_ms(8, seconds=3.0) == pytest.approx(3 * (4 + 16) + 0.5)
    short, long = gov.decide(8, 40.0, seconds=1.0), gov.decide(8, 40.0, seconds=3.0)
    assert short.k == 8 and not short.intervened  # 20.5 ms <= 32 ms
    assert long.k == 3 and "k=3" in long.explain()  # 3 * (4 + 2k) + 0.5 <= 32 -> k = 3
    gov.observe(Result("", 4, list(range(4)), 3 * (4 + 8) + 0.5, 12.0, 0.1, [6.0] * 4, 0.4), seconds=3.0)
    assert gov.layer_ms[-1] == pytest.approx(2.0) and gov.front_ms[-1] == pytest.approx(4.0)  # per second


def test_serve_answers_transcripts_of_whole_utterances(tiny_asr_export, utterance_folder):
    engine = open_engine(tiny_asr_export, "onnx")
    svc = ServiceThread(build_app(InferenceSession(engine, PolicySource(8, keep=0.75)), max_seconds=3.0)).start()
    try:
        path = utterance_folder / "utt_1.wav"
        status, body = post_wav(svc.url, path.read_bytes())
        assert status == 200 and body["k"] == 6 and body["target_ms"] is None  # a keep policy sets no target
        assert body["prediction"] == engine.run(utterance_from_wav(path), 6).prediction
        assert post_wav(svc.url, path.read_bytes(), "?deadline_ms=500")[1]["target_ms"] == 500.0
        status, body = post_wav(svc.url, (utterance_folder / "utt_2.wav").read_bytes())  # 3.7 s
        assert status == 422 and "(3.7 s) is over the 3 s cap" in body["error"]
        buf = io.BytesIO()
        sf.write(buf, np.full(8000, np.inf, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
        status, body = post_wav(svc.url, buf.getvalue())
        assert status == 422 and "non-finite" in body["error"]
        with urllib.request.urlopen(f"{svc.url}/v1/health", timeout=10) as resp:
            assert json.loads(resp.read())["task"] == "asr"
    finally:
        svc.stop()


def test_bench_runtimes_reports_wer_for_a_speech_recognition_run(tiny_asr_run, tiny_asr_export, utterance_folder):
    from ldfleet.simulations.bench_runtime import bench_runtimes

    clips = [(utterance_from_wav(p), "press one") for p in sorted(utterance_folder.glob("*.wav"))]
    rows = bench_runtimes(tiny_asr_run, tiny_asr_export, clips, keeps=(0.5,), warmup=1)
    assert [r.runtime for r in rows] == ["torch", "onnx", "onnx-int8"]
    assert all(r.accuracy is None and r.wer > 0 and r.cer > 0 and r.examples == 3 and r.k == 4 for r in rows)
    assert rows[0].wer == rows[1].wer and rows[0].cer == rows[1].cer  # fp32 onnx transcribes as torch does


def test_the_load_step_holds_utterances_to_a_real_time_factor_too(tiny_asr_export, utterance_folder):
    """For a speech-recognition run the load step adds ``governor_rtf``: each utterance is held to its
    own target (RTF x its seconds), the RTF chosen so that the targets add up as the ms target's do."""
    from ldfleet.simulations.bench_runtime import bench_load_step

    clips = [(utterance_from_wav(p), "press one") for p in sorted(utterance_folder.glob("*.wav"))]  # 0.6, 2.3, 3.7 s
    rows = {r.mode: r for r in bench_load_step(tiny_asr_export, clips, requests=30, target_ms=40.0, spinners=1)}
    assert list(rows) == ["fixed", "governor", "governor_rtf"]
    assert rows["governor"].rtf is None and rows["governor"].target_ms == pytest.approx(40.0)
    assert rows["governor_rtf"].rtf == pytest.approx(40.0 / (1000 * (0.6 + 2.3 + 3.7) / 3), rel=1e-3)
    assert rows["governor_rtf"].target_ms == pytest.approx(40.0, rel=1e-3)  # the same total time
    assert all(r.requests == 30 and 0 <= r.miss_rate <= 1 and r.wer is not None for r in rows.values())


def test_adaptive_depth_runs_on_the_device_as_in_evaluation(tiny_asr_run, tiny_asr_export, utterance_folder):
    """`--strategy adaptive`: a depth per input (the exported depth chooser and the manifest's lambdas),
    the same layers on torch, onnxruntime and `DynamicModel.choose` (what `ldfleet eval` runs)."""
    manifest = json.loads((tiny_asr_export / "manifest.json").read_text())
    assert manifest["adaptive"]["graph"] == "depth.onnx" and len(manifest["adaptive"]["lambdas"]) == 9
    torch_engine = open_engine(tiny_asr_run, "torch", strategy="adaptive")
    edge = open_engine(tiny_asr_export, "onnx-int8", strategy="adaptive")
    model = torch_engine.model
    depths = []
    for path in sorted(utterance_folder.glob("*.wav")):
        wave = utterance_from_wav(path)
        with torch.inference_mode():
            front = model.front_end(torch.from_numpy(wave).unsqueeze(0))
        for k in range(1, 9):
            a, b = torch_engine.run(wave, k), edge.run(wave, k)
            with torch.inference_mode():
                want = model.choose(front, "adaptive", k)[0].nonzero().flatten().tolist()
            assert a.layers == b.layers == want and a.k == k
            depths.append((k, len(want)))
    assert any(d != k for k, d in depths) and all(d == 8 for k, d in depths if k == 8)
    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_export), "--runtime", "onnx", "--strategy", "adaptive",
                              "--keep", "0.5", "--json", str(utterance_folder)])
    assert out.exit_code == 0 and "strategy adaptive" in out.output, out.output


def test_under_a_target_adaptive_keeps_its_depth_where_it_fits_and_is_capped_where_not(tiny_asr_run, tiny_asr_export,
                                                                                       utterance_folder):
    """``max_layers`` (the deepest run that fits the target) caps adaptive's depth, on torch and
    onnxruntime alike, and leaves a depth that fits alone; the governor gives it from its estimates,
    and the session runs adaptive at the policy's mean k with that cap."""
    torch_engine = open_engine(tiny_asr_run, "torch", strategy="adaptive")
    edge = open_engine(tiny_asr_export, "onnx", strategy="adaptive")
    selector = open_engine(tiny_asr_export, "onnx")
    capped = 0
    for path in sorted(utterance_folder.glob("*.wav")):
        wave = utterance_from_wav(path)
        for k in (2, 4, 6, 8):
            free = edge.run(wave, k).layers
            for cap in (1, 3, 5):
                a, b = torch_engine.run(wave, k, max_layers=cap), edge.run(wave, k, max_layers=cap)
                assert a.layers == b.layers and len(b.layers) == min(len(free), cap)
                if len(free) <= cap:
                    assert b.layers == free
                else:  # capped: the selector's own set at the cap
                    assert b.layers == selector.run(wave, cap).layers
                    capped += 1
    assert capped > 0
    assert len(selector.run(utterance_from_wav(utterance_folder / "utt_2.wav"), 6, max_layers=3).layers) == 3

    gov = Governor(8, cpu=type("Idle", (), {"busy": 0.1, "share": 1.0, "sample": lambda self: 0.1})(), battery=lambda: None)
    assert gov.decide(6, 40.0).max_layers is None  # no estimates yet: nothing to cap with
    for _ in range(3):  # 1 s inputs: front end 4 ms, 2 ms per layer, 0.5 ms besides
        gov.observe(Result("", 8, list(range(8)), 20.5, 4.0, 0.1, [2.0] * 8, 0.4), seconds=1.0)
    roomy, tight = gov.decide(6, 40.0, seconds=1.0), gov.decide(6, 40.0, seconds=3.0)
    assert (roomy.k, roomy.ceiling, roomy.max_layers) == (6, 6, 8)  # 4 + 16 + 0.5 <= 32 ms: all 8 fit
    assert (tight.k, tight.ceiling, tight.max_layers) == (3, 6, 3)  # 3 x (4 + 2k) + 0.5 <= 32: k = 3
    assert gov.decide(6).max_layers is None and gov.decide(6).ceiling == 6


def test_adaptive_is_refused_with_a_reason_where_the_run_has_no_depth_chooser(tiny_run, tiny_export):
    """The keyword fixtures had no depth stage."""
    with pytest.raises(ValueError, match="no fitted depth chooser"):
        open_engine(tiny_run, "torch", strategy="adaptive")
    with pytest.raises(ValueError, match="no depth chooser"):
        open_engine(tiny_export, "onnx", strategy="adaptive")
    out = runner.invoke(app, ["infer", "--run", str(tiny_run), "--strategy", "early_exit", "--keep", "0.5", "-"])
    assert out.exit_code != 0 and "a device runs one of selector, adaptive" in out.output


def test_the_exported_runtime_transcribes_on_a_board_without_torch(tiny_asr_export, utterance_folder):
    """The copy of edge_runtime.py in the export, as a board runs it (`python3 edge_runtime.py ...`),
    with torch and transformers unimportable: one JSON line per utterance, the transcript of the host
    runtime inside the package."""
    wav = utterance_folder / "utt_1.wav"
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        f"sys.path.insert(0, {str(tiny_asr_export)!r})\n"
        "import edge_runtime\n"
        f"edge_runtime.main([{str(tiny_asr_export)!r}, {str(wav)!r}, '--keep', '0.5', '--int8', '--strategy', 'adaptive'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    expected = EdgeModel(tiny_asr_export, "int8", strategy="adaptive").run(utterance_from_wav(wav), 4)
    assert (row["prediction"], row["layers"], row["k"]) == (expected.prediction, expected.layers, 4)


def test_infer_on_a_folder_takes_every_audio_format(tiny_asr_run, utterance_folder, tmp_path):
    """FLAC, OGG and MP3 in a folder are transcribed like WAV (they were silently skipped); dot files
    and other files are not inputs."""
    wave, rate = sf.read(utterance_folder / "utt_1.wav", dtype="float32")
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "a.flac", wave, rate)
    sf.write(folder / "sub" / "b.ogg", wave, rate)
    sf.write(folder / "c.mp3", wave, rate)
    (folder / ".d.wav").write_bytes((utterance_folder / "utt_1.wav").read_bytes())
    (folder / "notes.txt").write_text("not audio")
    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_run), "--keep", "0.5", "--json", str(folder)])
    assert out.exit_code == 0, out.output
    names = sorted(Path(json.loads(line)["input"]).name for line in out.stdout.splitlines() if line.startswith("{"))
    assert names == ["a.flac", "b.ogg", "c.mp3"]
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    device = runner.invoke(app, ["infer", "--run", str(tiny_asr_run), "--keep", "0.5", str(tmp_path / "zero.wav")])
    assert device.exit_code == 2 and "not a regular file" in device.output
    no_agent = runner.invoke(app, ["infer", "--run", str(tiny_asr_run), "--state-dir", str(tmp_path / "nobody"), str(folder)])
    assert no_agent.exit_code == 0 and "no device state in" in no_agent.output and "every layer runs" in no_agent.output
    (folder / "a.flac").unlink(), (folder / "sub" / "b.ogg").unlink(), (folder / "c.mp3").unlink()
    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_run), "--keep", "0.5", str(folder)])
    assert out.exit_code == 2 and "no audio files (.wav, .flac, .ogg, .mp3)" in out.output


def test_short_or_failing_inputs_are_refused_with_a_reason_and_nothing_else_stops(tiny_asr_run, tiny_asr_export,
                                                                                  utterance_folder, tmp_path):
    """Under 400 samples the front end has no frame: refused before the model (422 in serve, skipped by
    infer and by the board's edge_runtime.py); a runtime failure is a 500 that the service survives."""
    short = tmp_path / "short.wav"
    sf.write(short, np.full(100, 0.1, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match="too short"):
        utterance_from_wav(short)
    for runtime, target in (("torch", tiny_asr_run), ("onnx", tiny_asr_export)):
        with pytest.raises(ValueError, match="too short"):
            open_engine(target, runtime).run(np.zeros(100, dtype=np.float32), 4)
    good = utterance_folder / "utt_0.wav"
    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_run), "--keep", "0.5", "--json", str(short), str(good)])
    assert out.exit_code == 1 and "too short" in out.output and '"input"' in out.stdout  # the good one still ran
    board = subprocess.run([sys.executable, str(tiny_asr_export / "edge_runtime.py"), str(tiny_asr_export), str(short), str(good)],
                           capture_output=True, text=True, timeout=120)
    assert board.returncode == 1 and "skipped" in board.stderr and "too short" in board.stderr
    assert len(board.stdout.splitlines()) == 1 and "Traceback" not in board.stderr

    class Failing:  # a runtime that fails on every input, as onnxruntime does on a shape it cannot take
        task, num_layers, strategy = "asr", 8, "selector"

        def run(self, waveform, k, budget_ms=None, max_layers=None):
            raise RuntimeError("Invalid input shape")

    session = InferenceSession(Failing(), PolicySource(8, keep=0.5))
    svc = ServiceThread(build_app(session)).start()
    try:
        status, body = post_wav(svc.url, good.read_bytes())
        assert status == 500 and "Invalid input shape" in body["error"]
        assert post_wav(svc.url, short.read_bytes()) == (422, {"error": "100 samples at 16 kHz (6.25 ms) is too short: the model needs at least 400 (25 ms at 16 kHz)"})
        with urllib.request.urlopen(f"{svc.url}/metrics", timeout=10) as resp:
            assert 'ldfleet_infer_requests_total{status="500"} 1.0' in resp.read().decode()
    finally:
        svc.stop()
    assert session.stats.summary().errors == 1


def test_served_metrics_count_the_layers_that_ran(tiny_asr_export, utterance_folder):
    """/metrics counts each request under the number of layers that ran (adaptive's own depth), as the
    telemetry does, not under the policy's k."""
    from collections import Counter

    engine = open_engine(tiny_asr_export, "onnx", strategy="adaptive")
    svc = ServiceThread(build_app(InferenceSession(engine, PolicySource(8, keep=0.5)), max_seconds=5.0)).start()
    try:
        answers = [post_wav(svc.url, p.read_bytes())[1] for p in sorted(utterance_folder.glob("*.wav"))]
        with urllib.request.urlopen(f"{svc.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        svc.stop()
    ran = Counter(len(a["layers"]) for a in answers)
    assert any(a["k"] != len(a["layers"]) for a in answers)  # adaptive went off the mean somewhere
    for layers, n in ran.items():
        assert f'ldfleet_infer_layers_total{{k="{layers}"}} {float(n)}' in text


def test_adaptive_choosing_fewer_layers_is_no_deadline_intervention(tiny_asr_export, utterance_folder):
    session = InferenceSession(open_engine(tiny_asr_export, "onnx", strategy="adaptive"), PolicySource(8, keep=0.5))
    decisions = [session.infer(utterance_from_wav(p))[1] for p in sorted(utterance_folder.glob("*.wav"))]
    assert not any(d.intervened for d in decisions) and all(d.explain() == "policy k=4" for d in decisions)
    fresh = InferenceSession(open_engine(tiny_asr_export, "onnx", strategy="adaptive"), PolicySource(8, keep=0.75))
    result, guarded, _ = fresh.infer(utterance_from_wav(utterance_folder / "utt_2.wav"), deadline_ms=1e-3)  # no estimates yet
    assert result.chosen > 1 and len(result.layers) == 1  # the guard cut the chosen depth
    assert guarded.intervened and f"deadline guard: stopped after 1 of {result.chosen} layers" in guarded.explain()


def test_an_unfinished_run_is_served_with_a_warning(tiny_asr_run, utterance_folder, tmp_path):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(tiny_asr_run, run)
    (run / "train_state.json").write_text(json.dumps({"stage": "backbone", "epoch": 1, "done": False, "history": []}))
    out = runner.invoke(app, ["infer", "--run", str(run), "--keep", "0.5", str(utterance_folder / "utt_0.wav")])
    assert out.exit_code == 0 and "has not finished training (stage backbone, epoch 1)" in " ".join(out.output.split())


def test_an_rtf_target_scales_with_each_utterances_length(tiny_asr_export, utterance_folder, tmp_path):
    """A real-time factor is a target per second of audio: 0.6, 2.3 and 3.7 s utterances get 0.6, 2.3
    and 3.7 times the same per-second target, whether the policy comes from the agent's state or
    from --rtf; a request over its own target counts as a miss."""
    from ldfleet.client.agent import evaluate_policy
    from ldfleet.client.profile import synthetic_profile
    from ldfleet.client.state import DeviceState, save_device_state
    from ldfleet.common.schemas import BudgetPolicy, utcnow

    paths = sorted(utterance_folder.glob("*.wav"))
    seconds = [len(utterance_from_wav(p)) / 16000 for p in paths]
    profile = synthetic_profile("asr-1", "board", num_layers=8, layer_ms=1.0, front_end_ms=2.0)
    policy = BudgetPolicy(device_id="asr-1", version=1, source="class", device_class="board", rtf=0.05,
                          issued_at=utcnow(), issued_by="test")
    applied = evaluate_policy(policy, DeviceState(device_id="asr-1", device_class="board"), profile)
    assert applied.ack.status == "applied" and applied.state.effective_k == 8  # 2 + 8 x 1 ms <= 50 ms per 1 s
    save_device_state(tmp_path, applied.state)
    engine = open_engine(tiny_asr_export, "onnx")
    for source in (PolicySource(8, tmp_path), PolicySource(8, rtf=0.05)):
        session = InferenceSession(engine, source)
        targets = [session.infer(utterance_from_wav(p))[1].target_ms for p in paths]
        assert targets == pytest.approx([50.0 * s for s in seconds])
        assert source.current().rtf == 0.05 and source.current().latency_ms is None
    strict = InferenceSession(engine, PolicySource(8, rtf=1e-6))  # 1 us per second of audio: nothing fits
    for p in paths:
        result, decision, _ = strict.infer(utterance_from_wav(p))
        assert len(result.layers) == 1 and decision.intervened  # the governor, or the deadline guard, cut to one layer
    assert strict.stats.misses == len(paths)

    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_export), "--runtime", "onnx", "--rtf", "0.05", "--json",
                              str(utterance_folder)])
    assert out.exit_code == 0, out.output
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert "target RTF 0.05" in out.stderr and [r["target_ms"] for r in rows] == pytest.approx([50.0 * s for s in seconds], abs=1e-3)
    both = runner.invoke(app, ["infer", "--run", str(tiny_asr_export), "--runtime", "onnx", "--rtf", "0.05",
                               "--latency-ms", "40", str(utterance_folder)])
    assert both.exit_code == 2 and "give one target" in both.output
    for bad, why in [("--rtf=nan", "real-time factor"), ("--rtf=1000", "real-time factor"), ("--rtf=-1", "real-time factor"),
                     ("--keep=nan", "keep fraction"), ("--latency-ms=0", "latency target")]:
        out = runner.invoke(app, ["infer", "--run", str(tiny_asr_export), "--runtime", "onnx", bad, str(utterance_folder)])
        assert out.exit_code == 2 and f"{bad.split('=')[0]}: {why}" in out.output, (bad, out.output)  # no traceback


def test_warm_up_plans_the_first_request(tiny_asr_export, utterance_folder):
    """Before any request the governor has no estimates, so a first request under a target would run
    unplanned and be cut by the deadline guard; warming up gives it estimates, counts no request, and
    `infer` warms up before its first input."""
    wave = utterance_from_wav(sorted(utterance_folder.glob("*.wav"))[0])
    session = InferenceSession(open_engine(tiny_asr_export, "onnx"), PolicySource(8, latency_ms=1e6))
    assert session.governor.predictor() is None
    session.warm_up()
    assert session.governor.predictor() is not None and len(session.governor.layer_ms) == 2  # the first run discarded
    assert session.stats.requests == 0
    result, decision, _ = session.infer(wave)
    assert decision.max_layers == 8 and result.layers and not result.cut_short and session.stats.requests == 1

    out = runner.invoke(app, ["infer", "--run", str(tiny_asr_export), "--runtime", "onnx", "--latency-ms", "0.001",
                              "--json", str(utterance_folder)])
    assert out.exit_code == 0, out.output
    first = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))
    assert "predicted" in first["governor"] and first["k"] == 1  # planned by the governor, not cut by the guard
