"""The control-plane commands as an operator runs them: `ldfleet controller` and `ldfleet agent` as
processes, `budget ...` / `devices ...` through the CLI, `bench control-plane` on a small fleet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from control_fixtures import broker, wait_until  # noqa: F401 - fixtures
from ldfleet.cli import app

runner = CliRunner()
LDFLEET = [sys.executable, "-c", "from ldfleet.cli import app; app()"]


@pytest.fixture
def env(tmp_path: Path, broker, monkeypatch) -> dict[str, str]:
    values = {
        "LDFLEET_HOME": str(tmp_path / "home"),
        "LDFLEET_BROKER": broker.url,
        "LDFLEET_DB": f"sqlite:///{tmp_path / 'registry.db'}",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **values}


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def devices_json() -> list[dict]:
    code, out = cli("devices", "list", "--json")
    assert code == 0, out
    return json.loads(out)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_operator_workflow_with_real_processes(env, tmp_path):
    procs = [subprocess.Popen([*LDFLEET, "controller", "--poll-interval", "0.5"], env=env, stderr=subprocess.DEVNULL)]
    try:
        for i, (ms, seconds) in enumerate([("1,2,3,4", "1"), ("2,2,2,2", "2")]):  # cli-1's timings are for 2 s of audio
            procs.append(subprocess.Popen(
                [*LDFLEET, "agent", "--device-id", f"cli-{i}", "--device-class", "edge", "--layer-ms", ms,
                 "--front-end-ms", "1", "--reference-seconds", seconds, "--telemetry-interval", "0"], env=env,
                stderr=subprocess.DEVNULL))

        def all_at(version: int) -> bool:
            devs = devices_json()
            return len(devs) == 2 and all(d["converged"] and d["applied_version"] >= version for d in devs)

        assert wait_until(lambda: all_at(1), 60), devices_json()
        code, out = cli("devices", "list")
        assert code == 0 and "cli-0" in out and "edge" in out

        code, out = cli("budget", "set", "edge", "--keep", "0.5", "--by", "alice")
        assert code == 0 and "online controller(s): controller;" in out, out
        assert wait_until(lambda: all_at(2), 30), devices_json()
        devs = {d["device_id"]: d for d in devices_json()}
        assert devs["cli-0"]["effective_k"] == 2 and devs["cli-0"]["online"]
        state = json.loads((tmp_path / "home" / "devices" / "cli-0" / "device_state.json").read_text())
        assert state["version"] == 2 and state["effective_k"] == 2

        # a latency target becomes k per device, from each device's own per-layer timings
        code, out = cli("budget", "set", "edge", "--latency-ms", "8", "--percentile", "90", "--by", "bob")
        assert code == 0 and "2 device(s) measured no tail latency" in " ".join(out.split()), out  # --layer-ms: medians only
        assert wait_until(lambda: all_at(3), 30)
        devs = {d["device_id"]: d for d in devices_json()}
        assert devs["cli-0"]["effective_k"] == 2 and devs["cli-1"]["effective_k"] == 3  # 1+4+3=8; 1+2+2+2=7

        code, out = cli("budget", "show", "--json")
        shown = json.loads(out)
        assert code == 0 and shown["classes"]["edge"] == {"converged": 2, "devices": 2, "pending": 0}
        assert [(p["device_class"], p["version"], p["latency_ms"], p["percentile"]) for p in shown["policies"]] == [("edge", 2, 8.0, 90.0)]
        code, out = cli("budget", "history", "edge", "--json")
        hist = json.loads(out)
        assert [(h["issued_by"], h["old"], h["new"]) for h in hist] == [("alice", None, "keep 0.5"), ("bob", "keep 0.5", "latency 8 ms @p90")]
        assert cli("budget", "show")[0] == 0 and "alice" in cli("budget", "history", "edge")[1]

        # a real-time factor: ms per ms of audio, at each profile's reference length: 6 ms for cli-0's 1 s,
        # 12 ms for cli-1's 2 s
        code, out = cli("budget", "set", "edge", "--rtf", "0.006", "--percentile", "90", "--by", "carol")
        assert code == 0 and "RTF 0.006 @p90" in out and "with a profile: k=4: 1, k=1: 1" in out, out
        assert "cannot be met" not in out
        assert wait_until(lambda: all_at(4), 30)
        devs = {d["device_id"]: d for d in devices_json()}
        assert devs["cli-0"]["effective_k"] == 1 and devs["cli-1"]["effective_k"] == 4  # 1+4=5 <= 6; 1+2x4=9 <= 12
        assert devs["cli-0"]["desired_budget"] == "RTF 0.006 @p90"
        state = json.loads((tmp_path / "home" / "devices" / "cli-1" / "device_state.json").read_text())
        assert state["policy"]["rtf"] == 0.006 and state["policy"]["latency_ms"] is None
        shown = json.loads(cli("budget", "show", "--json")[1])
        assert [(p["version"], p["latency_ms"], p["rtf"]) for p in shown["policies"]] == [(3, None, 0.006)]
        hist = json.loads(cli("budget", "history", "edge", "--json")[1])
        assert hist[-1]["old"] == "latency 8 ms @p90" and hist[-1]["new"] == "RTF 0.006 @p90"

        # bad requests: refused with a reason, exit code 2, nothing written
        for args, why in [
            (["--keep", "-1"], "keep fraction"),
            (["--keep", "nan"], "keep fraction"),
            (["--keep", "1.5"], "keep fraction"),
            (["--latency-ms", "0"], "latency target"),
            (["--latency-ms", "-5"], "latency target"),
            (["--latency-ms", "inf"], "latency target"),
            (["--keep", "0.5", "--latency-ms", "5"], "exactly one"),
            (["--rtf", "0"], "real-time factor"),
            (["--rtf", "500"], "real-time factor"),
            (["--rtf", "0.1", "--latency-ms", "5"], "exactly one"),
            (["--keep", "0.5", "--percentile", "90"], "percentile"),
            ([], "exactly one"),
            (["--keep", "0.5", "--device", "nobody"], "unknown device"),
            (["--keep", "0.5", "--expires-in", "-3"], "expires-in"),
        ]:
            code, out = cli("budget", "set", "edge", *args)
            assert code == 2 and why in out, (args, out)
        code, out = cli("budget", "set", "ghost", "--keep", "0.5")
        assert code == 2 and "unknown device class 'ghost'" in out
        code, out = cli("budget", "set", "edge", "--keep", "0.5", "--broker", "http://nope")
        assert code == 2 and "mqtt://" in out
        assert json.loads(cli("budget", "history", "edge", "--json")[1]) == hist
        assert all_at(4)

        # a target below the front end plus one layer: applied at k=1, and the operator is told where
        code, out = cli("budget", "set", "edge", "--latency-ms", "3.5", "--by", "dave")
        assert code == 0 and "k=1: 2" in out and "cannot be met on 1 device(s)" in out, out
        assert "cli-0: latency 3.5 ms cannot be met on this device: k=1 is expected to take 5.0 ms" in out  # 1 + 4 ms
        assert "cli-1:" not in out  # 1 + 2 ms fits
        assert wait_until(lambda: all_at(5), 30)
        devs = {d["device_id"]: d for d in devices_json()}
        assert devs["cli-0"]["ack_status"] == "applied" and "cannot be met" in devs["cli-0"]["ack_reason"]
        assert devs["cli-1"]["ack_status"] == "applied" and devs["cli-1"]["ack_reason"] is None
        assert "cannot" in cli("devices", "list")[1]  # the table wraps its cells

        # agents leave: the registry sees them go offline
        _stop(procs[1:])
        assert wait_until(lambda: not any(d["online"] for d in devices_json()), 30)

        # with no controller running, a change stays pending: not shown as converged
        _stop(procs[:1])
        assert procs[0].returncode == 0
        code, out = cli("budget", "set", "edge", "--keep", "0.25", "--by", "erin")
        assert code == 0 and "no controller is online" in " ".join(out.split()), out
        shown = json.loads(cli("budget", "show", "--json")[1])
        assert shown["classes"]["edge"] == {"converged": 0, "devices": 2, "pending": 2}
        assert all(not d["converged"] and d["pending_policy_version"] == 5 for d in devices_json())
        code, out = cli("budget", "show")
        assert code == 0 and "no controller has resolved the change yet" in out
    finally:
        _stop(procs)


def test_a_measuring_agent_measures_again_with_reprofile_every(env):
    """`agent` measures the model on this machine, then again every second; with tolerance 0 the
    next measurement that differs at all is announced as a new profile revision."""
    from ldfleet.server.registry import Registry

    assert "cannot go with --profile-json or --layer-ms" in " ".join(
        cli("agent", "--device-id", "m-1", "--device-class", "edge", "--layer-ms", "1,2", "--reprofile-every", "5")[1].split())
    assert "cannot go with --profile-json or --no-agent" in " ".join(
        cli("client", "--device-id", "m-1", "--device-class", "edge", "--superlink", "127.0.0.1:9", "--model", "m", "--data", "d",
            "--no-agent", "--reprofile-every", "5")[1].split())
    procs = [subprocess.Popen([*LDFLEET, "controller", "--poll-interval", "0.5"], env=env, stderr=subprocess.DEVNULL),
             subprocess.Popen([*LDFLEET, "agent", "--device-id", "m-0", "--device-class", "edge", "--telemetry-interval", "0",
                               "--reprofile-every", "1", "--reprofile-tolerance", "0"], env=env, stderr=subprocess.DEVNULL)]
    reg = Registry(env["LDFLEET_DB"])
    try:
        def revision() -> int | None:
            dev = reg.device("m-0")
            return None if dev is None or dev.profile is None else dev.profile_revision

        assert wait_until(lambda: revision() is not None, 90), "the agent did not announce its measured profile"
        first = revision()
        assert wait_until(lambda: revision() > first, 60), "no new measurement was announced"
        assert reg.device("m-0").num_layers > 0
    finally:
        _stop(procs)
        reg.close()
    assert procs[1].returncode == 0


@pytest.mark.slow
def test_bench_control_plane_command_on_a_small_fleet(tmp_path, monkeypatch):
    monkeypatch.setenv("LDFLEET_HOME", str(tmp_path))
    code, out = cli("bench", "control-plane", "--devices", "20", "--rounds", "2", "--json")
    assert code == 0, out
    (res,) = json.loads(out[out.index("["):])
    assert res["devices"] == 20 and res["all_acked"] and len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert r["acked"] == 20 and r["converged_pct"] == 100.0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["registry_converged_ms"] is not None and r["fanout_p50_ms"] <= r["max_ms"]
    # its own broker: no drop notices; the registry's audit: versions 1..3 on every device
    assert res["broker_drop_notices"] == 0 and res["version_gaps"] == 0 and res["version_mismatches"] == 0


def test_bench_control_plane_refuses_a_broker_restart_on_a_broker_it_does_not_run():
    code, out = cli("bench", "control-plane", "--devices", "5", "--restart-broker", "--broker", "mqtt://127.0.0.1:1")
    assert code != 0 and "--restart-broker" in out


@pytest.mark.slow
def test_bench_control_plane_restarts_its_broker_in_round_1_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LDFLEET_HOME", str(tmp_path))
    code, out = cli("bench", "control-plane", "--devices", "20", "--rounds", "2", "--restart-broker", "--json")
    assert code == 0, out
    (res,) = json.loads(out[out.index("["):])
    assert [r["restarted_broker"] for r in res["rounds"]] == [True, False]
    first, second = res["rounds"]
    assert isinstance(first["acked_before_restart"], int) and second["acked_before_restart"] is None
    assert first["acked_before_restart"] < 20  # mid-change: the restart came before every device had answered
    assert res["all_acked"] and res["version_gaps"] == 0 and res["version_mismatches"] == 0


def test_budget_show_says_when_an_overridden_device_moved_class(tmp_path):
    from ldfleet.server.operator import set_budget
    from ldfleet.server.registry import Registry
    from ldfleet.server.registry.models import Device

    db = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(db)
    try:
        reg.add_class("phone")
        with reg.session() as s:
            s.merge(Device(device_id="ph-01", device_class="phone", desired_version=0, applied_version=0, online=False,
                           class_pinned=False))
        set_budget(reg, None, "phone", keep=0.5, device_id="ph-01", issued_by="ops")
        reg.pin_class("ph-01", "rpi4", create_class=True)
    finally:
        reg.close()
    code, out = cli("budget", "show", "--db", db)
    assert code == 0 and "phone (device now in rpi4)" in " ".join(out.split()), out
