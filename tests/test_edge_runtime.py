"""Edge runtime: ONNX export equals torch, the host runtime needs no torch, `ldfleet infer`, the governor,
the policy read from the agent's state."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_fixtures import tiny_export, tiny_run, wav_folder  # noqa: F401 - fixtures
from ldfleet.cli import app
from ldfleet.client.governor import CpuMeter, Governor
from ldfleet.client.infer import PolicySource, clip_from_wav, open_engine
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.common.edge_runtime import EdgeModel, Result
from ldfleet.common.schemas import BudgetPolicy, utcnow

runner = CliRunner()


def test_export_writes_every_part_and_fp32_equals_torch(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert len(manifest["graphs"]["fp32"]["layers"]) == manifest["num_layers"] == 8
    assert all((tiny_export / g).exists() for g in manifest["graphs"]["int8"]["layers"])
    assert manifest["max_abs_diff_fp32"] <= 1e-4
    assert (tiny_export / "edge_runtime.py").exists()


def test_dropped_layers_are_never_run(tiny_export, wav_folder):
    model = EdgeModel(tiny_export)
    wave = clip_from_wav(wav_folder / "clip_00.wav")
    calls = []
    for i, sess in enumerate(model.layers):
        def counting(out, feeds, _sess=sess, _i=i):
            calls.append(_i)
            return _sess.run(out, feeds)
        model.layers[i] = type("Counted", (), {"run": staticmethod(counting)})()
    r = model.run(wave, 3)
    assert calls == r.layers and len(r.layers) == 3 and r.k == 3


def test_deadline_guard_stops_the_chosen_layers_early(tiny_run, tiny_export, wav_folder):
    wave = clip_from_wav(wav_folder / "clip_04.wav")
    for engine in (EdgeModel(tiny_export), open_engine(tiny_run, "torch")):
        assert len(engine.run(wave, 8, budget_ms=1e-3).layers) == 1  # at least one layer always runs
        assert len(engine.run(wave, 6, budget_ms=1e6).layers) == 6


def test_host_runtime_imports_no_torch(tiny_export, wav_folder):
    """Both the package module and the copy in the export run with torch and transformers unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        f"sys.path.insert(0, {str(tiny_export)!r})\n"
        "import edge_runtime, ldfleet.common.edge_runtime as pkg\n"
        f"m = edge_runtime.EdgeModel({str(tiny_export)!r}, 'int8')\n"
        f"r = m.run(edge_runtime.read_wav({str(wav_folder / 'clip_01.wav')!r}), 4)\n"
        "print(r.prediction, r.k, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    label, k, torch_loaded = out.stdout.split()
    assert k == "4" and torch_loaded == "False"


def test_infer_cli_torch_and_onnx_agree(tiny_run, tiny_export, wav_folder):
    args = ["--keep", "0.5", "--json", str(wav_folder)]
    torch_out = runner.invoke(app, ["infer", "--run", str(tiny_run), *args])
    onnx_out = runner.invoke(app, ["infer", "--run", str(tiny_export), "--runtime", "onnx", *args])
    assert torch_out.exit_code == 0 and onnx_out.exit_code == 0, torch_out.output + onnx_out.output
    rows_t = [json.loads(line) for line in torch_out.stdout.splitlines() if line.startswith("{")]
    rows_o = [json.loads(line) for line in onnx_out.stdout.splitlines() if line.startswith("{")]
    assert len(rows_t) == 12 and {"input", "k", "layers", "ms", "prediction"} <= set(rows_t[0])
    assert [r["k"] for r in rows_t] == [4] * 12
    assert [(r["prediction"], r["layers"]) for r in rows_t] == [(r["prediction"], r["layers"]) for r in rows_o]


def test_infer_reads_stdin_and_refuses_bad_input(tiny_run, wav_folder, tmp_path):
    wav = (wav_folder / "clip_02.wav").read_bytes()
    ok = runner.invoke(app, ["infer", "--run", str(tiny_run), "--keep", "1.0", "--json", "-"], input=wav)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[-1])["k"] == 8
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    out = runner.invoke(app, ["infer", "--run", str(tiny_run), str(bad)])
    assert out.exit_code == 1 and "skipped" in out.output
    wrong = runner.invoke(app, ["infer", "--run", str(tiny_run), "--runtime", "onnx", str(bad)])
    assert wrong.exit_code == 2 and "ldfleet export" in wrong.output


def _state(folder, version, keep=None, latency_ms=None, k=None):
    policy = BudgetPolicy(device_id="d1", version=version, source="class", keep=keep, latency_ms=latency_ms, k=k,
                          num_layers=8, issued_at=utcnow(), issued_by="test")
    save_device_state(folder, DeviceState(device_id="d1", device_class="c", version=version, policy=policy, effective_k=k))


def test_policy_source_follows_the_agent_state(tmp_path):
    src = PolicySource(8, tmp_path)
    assert src.current().k == 8 and src.current().source == "none"
    _state(tmp_path, 1, keep=0.5, k=4)
    assert (src.current().k, src.current().version) == (4, 1)
    _state(tmp_path, 2, latency_ms=30.0, k=6)
    p = src.current()
    assert (p.k, p.version, p.latency_ms) == (6, 2, 30.0)
    (tmp_path / "device_state.json").write_text("{corrupt")
    assert src.current().version == 2  # the last good policy stays in force


class _Cpu(CpuMeter):
    def __init__(self, values, shares=()):
        self.values, self.shares, self.busy, self.share = list(values), list(shares), 0.0, 1.0

    def sample(self):
        self.busy = self.values.pop(0) if self.values else self.busy
        self.share = self.shares.pop(0) if self.shares else self.share
        return self.busy


def _result(k, layer_ms=2.0, front_ms=4.0):
    return Result("yes", k, list(range(k)), front_ms + k * layer_ms + 0.5, front_ms, 0.1, [layer_ms] * k, 0.4)


def test_governor_lowers_k_to_meet_a_deadline_and_says_why():
    gov = Governor(8, cpu=_Cpu([0.3] * 30), battery=lambda: None)
    first = gov.decide(8, 20.0)
    assert first.k == 8 and not first.intervened  # nothing known yet: the policy's k
    for _ in range(5):
        gov.observe(_result(8))
    d = gov.decide(8, 20.0)  # 4 + 0.5 + 2k <= 16 -> k = 5
    assert d.k == 5 and d.intervened and "deadline 20.0 ms" in d.explain() and "k=5" in d.explain()
    assert gov.decide(3, 20.0).k == 3  # never above the policy
    assert gov.decide(8, None).k == 8  # no target: the policy's k


def test_governor_reacts_to_cpu_load_before_requests_slow_down():
    gov = Governor(8, cpu=_Cpu([0.3] * 6 + [0.9]), battery=lambda: None)
    for _ in range(6):
        gov.decide(8, 30.0)
        gov.observe(_result(8))
    calm = gov.predict_ms(8)
    d = gov.decide(8, 30.0)  # busy 0.9 vs 0.3 -> estimates x (0.7 / 0.1)
    assert calm <= 24.0 and d.k < 8 and "CPU busy 90%" in d.explain()


def test_governor_reacts_to_new_runnable_tasks():
    gov = Governor(8, cpu=_Cpu([1.0] * 7, shares=[1.0] * 6 + [0.5]), battery=lambda: None)
    for _ in range(6):
        gov.decide(8, 30.0)
        gov.observe(_result(8))
    d = gov.decide(8, 30.0)  # twice as many runnable tasks as cores: estimates x2 -> 2 * (4.5 + 2k) <= 24
    assert d.k == 3 and "50% of a core per task" in d.explain()


def test_cpu_meter_reads_proc_stat():
    meter = CpuMeter(min_jiffies=0)
    assert 0.0 <= meter.sample() <= 1.0 and 0.0 < meter.share <= 1.0


def test_governor_caps_k_on_a_low_discharging_battery():
    gov = Governor(8, cpu=_Cpu([0.1]), battery=lambda: (0.1, True))
    d = gov.decide(8)
    assert d.k == 4 and "battery 10%" in d.explain()
    assert Governor(8, cpu=_Cpu([0.1]), battery=lambda: (0.1, False)).decide(8).k == 8


def test_open_engine_refuses_mismatched_folders(tiny_run, tiny_export):
    with pytest.raises(ValueError, match="ONNX export"):
        open_engine(tiny_export, "torch")
    with pytest.raises(FileNotFoundError, match="ldfleet export"):
        open_engine(tiny_run, "onnx")
    r = open_engine(tiny_export, "onnx-int8").run(np.zeros(16000, dtype=np.float32) + 0.01, 8)
    assert r.layers == list(range(8))
