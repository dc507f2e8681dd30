"""`ldfleet simulate` on a speech-recognition fleet (``task: asr``), end to end and tiny: an espeak-ng
phrase corpus, a CTC warm-up, Flower rounds, then WER per class at each class's budget in the registry
(per device and round, with its class and k), in `ldfleet registry ...` and in the report; the devices
also transcribe held-out utterances through the on-device inference path (``serve``) and their
inference telemetry reaches the registry."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fleet_fixtures import ldfleet_cli, scenario_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SCENARIO = {
    "name": "asr-e2e",
    "task": "asr",
    "rounds": 2,
    "min_devices": 2,
    "profiles_file": str(ROOT / "configs" / "device-classes.yaml"),
    "classes": [
        {"name": "mcu", "count": 1, "profile": "mcu-class", "budget": {"keep": 0.25}},
        # a real-time factor (ms of compute per ms of audio) the controller resolves to k on the device's
        # profile; 1.0 lets every layer fit on any machine, so k stays 8 wherever the test runs
        {"name": "jetson", "count": 1, "profile": "jetson", "budget": {"rtf": 1.0}},
    ],
    # 2 voices x 3 variants: one training speaker per voice, i.e. per device
    "data": {"asr_corpus": {"voices": 2, "variants_per_voice": 3, "utterances_per_speaker": 4}},
    "warm": {"epochs": 1, "early_exit_epochs": 1, "batch_size": 8},
    "training": {"local_epochs": 1, "batch_size": 4},
    "report_keeps": [0.25, 0.75, 1.0],
    "serve": {"requests_per_device": 3},
}
K = {"mcu": 2, "jetson": 8}  # keep 0.25 of 8 layers; RTF 1.0: all of them


def test_asr_fleet_reports_wer_per_class_at_its_budget(tmp_path_factory):
    cfg, run, cache = scenario_run(tmp_path_factory, "asr-e2e", SCENARIO)
    res = ldfleet_cli("simulate", "--config", str(cfg), "--out", str(run), "--cache", str(cache))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "WER % / mean layers" in res.stdout  # the progress lines show WER, not an accuracy
    assert "served 6 requests" in res.stdout  # 3 per device after each round: whole utterances transcribed

    # each device's requests ran at its class's k and reached the registry as inference telemetry
    usage = json.loads(ldfleet_cli("registry", "usage", "--source", "inference", "--run", str(run), "--json").stdout)["usage"]
    assert sorted(u["requests"] for u in usage.values()) == [6, 6]
    assert sorted(u["mean_layers"] for u in usage.values()) == [K["mcu"], K["jetson"]]

    # registry: the RTF class's devices hold the policy as sent (the RTF, the k resolved from it) and applied it
    with sqlite3.connect(run / "registry.db") as con:
        desired = [(json.loads(d), a) for d, a in con.execute("select desired, applied_version from devices where device_class = 'jetson'")]
    assert [(d["rtf"], d["keep"], d["k"], a == d["version"]) for d, a in desired] == [(1.0, None, 8, True)]

    # registry: one eval row per device and round, with its class, k and a WER (no accuracy in disguise)
    with sqlite3.connect(run / "registry.db") as con:
        rows = con.execute(
            "select r.number, m.device_id, m.device_class, m.phase, m.k, m.accuracy, m.wer, m.cer "
            "from round_metrics m join rounds r on r.id = m.round_id where m.phase in ('train', 'eval')").fetchall()
    evals = [r for r in rows if r[3] == "eval"]
    assert sorted((r[0], r[2]) for r in evals) == [(1, "jetson"), (1, "mcu"), (2, "jetson"), (2, "mcu")]
    for _, _, cls, _, k, acc, wer, cer in rows:
        assert k == K[cls] and acc is None
        assert wer is not None and wer >= 0 and cer is not None and cer >= 0

    # ldfleet registry devices/rounds: the per-round WER of each device with its class and k
    devs = json.loads(ldfleet_cli("registry", "devices", "--run", str(run), "--json").stdout)["devices"]
    assert {d["device_class"] for d in devs} == {"mcu", "jetson"}
    for d in devs:
        assert d["wer"] is not None and d["wer"] >= 0 and d["k"] == K[d["device_class"]]
        ev = [r for r in d["rounds"] if r["phase"] == "eval"]
        assert [r["round"] for r in ev] == [1, 2] and all(r["k"] == K[d["device_class"]] and r["wer"] >= 0 for r in ev)
        assert "accuracy" not in ev[0]
    table = ldfleet_cli("registry", "devices", "--run", str(run))
    assert table.returncode == 0 and "WER" in table.stdout
    rounds = json.loads(ldfleet_cli("registry", "rounds", "--run", str(run), "--json").stdout)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["wer"] >= 0 for r in rounds)
    assert set(rounds[-1]["classes"]) == {"mcu", "jetson"} and all("wer" in c and "accuracy" not in c
                                                                   for c in rounds[-1]["classes"].values())

    # report: WER per class at its keep ratio, consistent with the registry and the held-out rows
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["task"] == "asr" and summary["metric"] == "wer"
    last = {r[2]: r[6] for r in evals if r[0] == 2}  # one device per class: the class's WER is its device's
    heldout = {(r["method"], r["k"]): r for r in summary["heldout"]["rows"]}
    for c in summary["classes"]:
        k = K[c["device_class"]]
        assert c["k"] == k and c["keep_ratio"] == pytest.approx(k / 8)
        assert c["fleet_wer_last_round"] == pytest.approx(last[c["device_class"]])
        for method in ("selector", "random", "early_exit"):
            assert c[f"heldout_{method}_wer"] == pytest.approx(heldout[(method, k)]["wer"]) and c[f"heldout_{method}_wer"] >= 0
        assert "heldout_selector" not in c and "fleet_accuracy_last_round" not in c
    md = (run / "report" / "report.md").read_text()
    assert "WER per class and keep ratio" in md and "held-out selector WER" in md
    for c in summary["classes"]:
        assert f"| {c['device_class']} | {c['budget']} | {c['k']}/8 | {c['keep_ratio']:.3f} |" in md
    for name in ("wer_per_round.png", "wer_vs_keep.png", "layer_usage.png"):
        assert (run / "report" / name).stat().st_size > 0
