"""`ldfleet simulate` end to end as a user runs it, with the faults the issue asks for:

* an operator changes a budget from another "terminal" (`ldfleet budget set`) while the run goes on:
  the rounds after the change use the new policy version (registry rows);
* a scheduled crash of a device mid-round: the round completes with the rest, the failure is a row
  without metrics;
* the simulation is killed (SIGKILL, whole process group) mid-round and `--resume` finishes it: every
  round exactly once, finished rounds untouched;
* the report and `ldfleet registry rounds|devices|usage` read the result.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from fleet_fixtures import LDFLEET, TINY_FLEET, scenario_run
from fleet_fixtures import ldfleet_cli as _cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SCENARIO = {
    "name": "e2e",
    "rounds": 5,
    "min_devices": 2,
    "profiles_file": str(ROOT / "configs" / "device-classes.yaml"),
    "classes": [
        {"name": "mcu", "count": 2, "profile": "mcu-class", "budget": {"keep": 0.25}},
        {"name": "rpi4", "count": 2, "profile": "rpi4", "budget": {"keep": 0.75}},
    ],
    **TINY_FLEET,  # the corpus and warm model of tests/test_flower_simulation.py: built once, cached
    "report_keeps": [0.25, 0.5, 1.0],
    "events": [
        {"round": 4, "crash": {"count": 1}},
        {"round": 5, "set_budget": {"device_class": "mcu", "keep": 0.5}},
    ],
}


def _rounds(db: Path) -> list[tuple[int, int, str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select id, number, status, started_at from rounds order by number").fetchall()
    except sqlite3.Error:
        return []


def _wait(pred, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"simulate exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out; log:\n{log.read_text()[-3000:]}")


def test_simulate_budget_change_crash_kill_and_resume(tmp_path_factory):
    cfg, run, cache = scenario_run(tmp_path_factory, "e2e", SCENARIO)
    tmp = cfg.parent
    db = run / "registry.db"
    log = tmp / "first.log"
    proc = subprocess.Popen([LDFLEET, "simulate", "--config", str(cfg), "--out", str(run), "--cache", str(cache), "--no-report"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    try:
        # 1. after round 1: the operator halves... raises rpi4 to keep 0.5 from another terminal
        _wait(lambda: any(n == 1 and s == "finished" for _, n, s, _ in _rounds(db)), 600, proc, log)
        info = json.loads((run / "run.json").read_text())
        res = _cli("budget", "set", "rpi4", "--keep", "0.5", "--broker", info["broker_url"], "--db", info["db_url"], "--by", "tester")
        assert res.returncode == 0, res.stdout + res.stderr
        changed_during = max(n for _, n, _, _ in _rounds(db))  # the round running (or last started) at the change
        # 2. kill the whole simulation mid-round (round >= 3 running)
        _wait(lambda: any(n >= 3 and s == "running" for _, n, s, _ in _rounds(db)), 300, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    before = _rounds(db)
    killed_round = next(n for _, n, s, _ in before if s == "running")
    finished_before = {n: started for _, n, s, started in before if s == "finished"}
    assert killed_round not in finished_before

    # 3. resume: finishes the run, with the report
    res = _cli("simulate", "--resume", str(run), "--cache", str(cache))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout
    after = _rounds(db)
    assert [n for _, n, _, _ in after] == [1, 2, 3, 4, 5]  # each round exactly once
    assert all(s == "finished" for _, _, s, _ in after)
    for _, n, _, started in after:
        if n in finished_before:
            assert started == finished_before[n]  # a finished round is never rewritten
    assert json.loads((run / "run.json").read_text())["status"] == "finished"

    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select r.number, m.device_id, m.device_class, m.phase, m.policy_version, m.k, m.accuracy, m.num_examples "
            "from round_metrics m join rounds r on r.id = m.round_id").fetchall()
    keys = [(r[0], r[1], r[3]) for r in rows]
    assert len(keys) == len(set(keys))
    ok = [r for r in rows if not r[3].endswith("-failed")]
    # budget change mid-run: rpi4 ran k=6 (keep 0.75) before, k=4 (keep 0.5) with a newer version after
    rpi = [r for r in ok if r[2] == "rpi4"]
    first = {r[4] for r in rpi if r[0] == 1}
    # rounds started after the change: those past the one running at the change, and the killed round,
    # which the resume discarded and ran again (on a loaded machine the change may land in the last round)
    later = [r for r in rpi if r[0] > changed_during or r[0] == killed_round]
    assert later and all(r[5] == 4 for r in later) and all(r[5] == 6 for r in rpi if r[0] == 1)
    assert min(r[4] for r in later) > max(first)
    # scheduled event after the resume: mcu goes to keep 0.5 (k=4) in round 5
    assert {r[5] for r in ok if r[2] == "mcu" and r[0] == 5} == {4}
    assert {r[5] for r in ok if r[2] == "mcu" and r[0] < 5} == {2}
    # crash at round 4: one failure row, no metrics, no train result for that device; the round completed
    fails = [r for r in rows if r[0] == 4 and r[3] == "train-failed"]
    assert len(fails) == 1 and fails[0][6] is None and fails[0][7] is None
    assert not [r for r in ok if r[0] == 4 and r[1] == fails[0][1] and r[3] == "train"]
    assert len([r for r in ok if r[0] == 4 and r[3] == "train"]) == 3

    # 4. report + registry commands
    rep = run / "report"
    for name in ("report.md", "report.html", "summary.json", "accuracy_per_round.png", "accuracy_vs_keep.png", "layer_usage.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["rounds_finished"] == 5 and {c["device_class"] for c in summary["classes"]} == {"mcu", "rpi4"}
    assert summary["traffic"]["ratio_base"] > 100
    assert {r["method"] for r in summary["heldout"]["rows"]} >= {"selector", "random", "early_exit"}
    res = _cli("registry", "rounds", "--run", str(run), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4, 5]
    assert [f["device_id"] for f in data["rounds"][3]["failed"]] == [fails[0][1]]
    res = _cli("registry", "devices", "--run", str(run), "--json")
    devs = {d["device_id"]: d for d in json.loads(res.stdout)["devices"]}
    assert len(devs) == 4 and devs[fails[0][1]]["failures"] == [{"round": 4, "phase": "train-failed"}]
    assert all(len(d["policy_versions_used"]) >= 2 for d in devs.values() if d["device_class"] == "rpi4")
    res = _cli("registry", "usage", "--run", str(run), "--json")
    usage = json.loads(res.stdout)
    assert usage["round"] == 5 and set(usage["usage"]) == {"mcu", "rpi4"}
    assert sum(usage["usage"]["mcu"]["usage"]) == pytest.approx(4.0)
