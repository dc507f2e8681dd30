"""`ldfleet simulate --serve N`: simulated devices also serve traffic between rounds (issue 10).

A tiny fleet (real Mosquitto, controller, agents, Flower rounds) where every device runs N requests
on its held-out clips after each round through the on-device inference path, and publishes the
inference telemetry: the registry then holds roll-up rows for every device whose request counts
equal what was sent, and `ldfleet registry usage --source inference` and the report show them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fleet_fixtures import TINY_FLEET, scenario_run
from fleet_fixtures import ldfleet_cli as _cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 3
ROUNDS = 2

SCENARIO = {
    "name": "serving",
    "rounds": ROUNDS,
    "min_devices": 2,
    "profiles_file": str(ROOT / "configs" / "device-classes.yaml"),
    "classes": [
        {"name": "mcu", "count": 2, "profile": "mcu-class", "budget": {"keep": 0.25}},
        {"name": "rpi4", "count": 1, "profile": "rpi4", "budget": {"keep": 0.75}},
    ],
    **TINY_FLEET,  # the corpus and warm model the other fleet tests build: cached in the session's sim-cache
    "report_keeps": [0.5, 1.0],
}


def test_simulated_devices_serve_and_their_telemetry_is_rolled_up(tmp_path_factory):
    cfg, run, cache = scenario_run(tmp_path_factory, "serving", SCENARIO)
    res = _cli("simulate", "--config", str(cfg), "--out", str(run), "--cache", str(cache), "--serve", str(REQUESTS), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"served {3 * REQUESTS} requests" in res.stdout

    devices = [d["device_id"] for d in json.loads((run / "fleet.json").read_text())["devices"]]
    expected = ROUNDS * REQUESTS
    assert json.loads((run / "serving.json").read_text()) == {d: expected for d in devices}

    # the registry: per-device per-minute rows whose request counts sum to what each device sent
    with sqlite3.connect(run / "registry.db") as con:
        rows = con.execute("select device_id, requests, messages, k_counts from inference_rollups").fetchall()
    per_device: dict[str, list[int]] = {}
    for device_id, requests, messages, k_counts in rows:
        per_device.setdefault(device_id, [0, 0])
        per_device[device_id][0] += requests
        per_device[device_id][1] += messages
        assert sum(json.loads(k_counts) if isinstance(k_counts, str) else k_counts) == requests
    assert per_device == {d: [expected, ROUNDS] for d in devices}  # one summary per device and round

    # the class policies bound k: the mcu devices (keep 0.25) ran fewer layers than the rpi4 (keep 0.75)
    res = _cli("registry", "usage", "--source", "inference", "--run", str(run), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    usage = json.loads(res.stdout)["usage"]
    assert {d: u["requests"] for d, u in usage.items()} == {d: expected for d in devices}
    mcu, rpi4 = [d for d in devices if "mcu" in d], [d for d in devices if "rpi4" in d]
    assert max(usage[d]["mean_layers"] for d in mcu) < usage[rpi4[0]]["mean_layers"]

    summary = json.loads((run / "report" / "summary.json").read_text())
    assert {d: v["requests"] for d, v in summary["inference_usage"].items()} == {d: expected for d in devices}
    assert "Served requests" in (run / "report" / "report.md").read_text()
