"""Scenario files: the shipped ones validate, bad ones fail with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldfleet.simulations.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_fleet_small_is_the_promised_default():
    scn = load_scenario(CONFIGS / "fleet-small.yaml")
    assert len(scn.classes) >= 3
    assert scn.num_devices >= 12
    assert {c.profile for c in scn.classes} <= set(scn.profiles)
    # a budget change and a crash are scheduled, both inside the run
    assert any(e.set_budget for e in scn.events) and any(e.crash for e in scn.events)
    assert all(e.round <= scn.rounds for e in scn.events)


def test_fleet_100_has_100_devices_and_the_five_profiles():
    scn = load_scenario(CONFIGS / "fleet-100.yaml")
    assert scn.num_devices == 100
    assert {"mcu-class", "rpi4", "jetson", "phone", "server"} <= set(scn.profiles)
    assert scn.data.partition.kind == "dirichlet"


def test_device_ids_are_stable_and_unique():
    scn = load_scenario(CONFIGS / "fleet-100.yaml")
    ids = [d for d, _ in scn.device_ids()]
    assert len(ids) == len(set(ids)) == 100
    assert ids == [d for d, _ in load_scenario(CONFIGS / "fleet-100.yaml").device_ids()]
    assert ids[0] == "mcu-01"


def _base() -> dict:
    return yaml.safe_load((CONFIGS / "fleet-small.yaml").read_text())


def _error(data: dict) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "test.yaml", base_dir=CONFIGS)
    return str(info.value)


def test_budget_needs_exactly_one_of_keep_and_latency():
    data = _base()
    data["classes"][0]["budget"] = {"keep": 0.5, "latency_ms": 30}
    msg = _error(data)
    assert "classes.0.budget" in msg and "exactly one budget" in msg and "got keep and latency_ms" in msg


def test_a_class_budget_may_be_a_real_time_factor():
    data = _base()
    data["classes"][0]["budget"] = {"rtf": 0.05, "percentile": 90}
    data["events"] = [{"round": 2, "set_budget": {"device_class": data["classes"][0]["name"], "rtf": 0.1}}]
    scn = parse_scenario(data, "test.yaml", base_dir=CONFIGS)
    assert scn.classes[0].budget.text() == "RTF 0.05 @p90"
    assert scn.events[0].set_budget.fields() == {"keep": None, "latency_ms": None, "rtf": 0.1, "percentile": None}
    data["classes"][0]["budget"] = {"rtf": 0.05, "latency_ms": 40}
    assert "got latency_ms and rtf" in _error(data)
    data["classes"][0]["budget"] = {"keep": 0.5, "percentile": 90}
    assert "percentile only goes with" in _error(data)


def test_unknown_profile_is_named():
    data = _base()
    data["classes"][1]["profile"] = "toaster"
    msg = _error(data)
    assert "classes.1.profile" in msg and "toaster" in msg and "rpi4" in msg


def test_event_for_unknown_class_and_late_event():
    data = _base()
    data["events"] = [{"round": 2, "set_budget": {"device_class": "nope", "keep": 0.5}}]
    assert "unknown device class 'nope'" in _error(data)
    data["events"] = [{"round": 99, "crash": {"count": 1}}]
    assert "after the last round" in _error(data)


def test_unknown_fields_and_bad_ranges_are_refused():
    data = _base()
    data["fraction_sampled"] = 1.5
    data["rounds_typo"] = 3
    msg = _error(data)
    assert "fraction_sampled" in msg and "rounds_typo" in msg


def test_quoted_numbers_and_booleans_are_refused_not_coerced():
    """YAML reads "0.05" as a string and yes as true: a scenario that says so is a mistake, not a number."""
    data = _base()
    data["classes"][0]["budget"] = {"keep": "0.5"}
    data["classes"][1]["budget"] = {"rtf": True}
    data["classes"][1]["count"] = "2"
    data["rounds"] = 2.0
    msg = _error(data)
    for where in ("classes.0.budget.keep", "classes.1.budget.rtf", "classes.1.count", "rounds"):
        assert where in msg, msg
    data = _base()
    data["classes"][0]["budget"] = {"keep": 1}  # an integer is a number
    assert parse_scenario(data, "test.yaml", base_dir=CONFIGS).classes[0].budget.keep == 1.0


def test_events_and_names_that_cannot_work_are_refused_before_the_run():
    data = _base()
    cls = data["classes"][0]["name"]
    other = data["classes"][1]["name"]
    for event, words in [
        ({"round": 2, "set_budget": {"device_class": cls, "device": "nope-01", "keep": 0.5}}, "no device 'nope-01'"),
        ({"round": 2, "set_budget": {"device_class": cls, "device": f"{other}-01", "keep": 0.5}}, f"in class '{cls}'"),
        ({"round": 2, "crash": {"devices": ["nope-99"]}}, "unknown devices ['nope-99']"),
        ({"round": 2, "crash": {"count": 10_000}}, "exceeds the fleet size"),
    ]:
        data["events"] = [event]
        assert "events.0" in _error(data) and words in _error(data), event
    data["events"] = [{"round": 2, "set_budget": {"device_class": cls, "device": f"{cls}-01", "keep": 0.5}}]
    assert parse_scenario(data, "test.yaml", base_dir=CONFIGS).events[0].set_budget.device == f"{cls}-01"
    data = _base()
    for name in ("../../tmp/evil", "", "a/b"):
        data["name"] = name
        assert "name" in _error(data)
    data = _base()
    data["profiles_file"] = 5
    assert "profiles_file: a file name, got 5" in _error(data)


def test_voice_partition_needs_a_speaker_per_device():
    data = _base()
    data["data"]["corpus"]["variants_per_voice"] = 1  # 8 speakers for 12 devices
    msg = _error(data)
    assert "data.partition" in msg or "voice partitioning" in msg


def test_duplicate_class_names():
    data = _base()
    data["classes"][1]["name"] = data["classes"][0]["name"]
    assert "unique" in _error(data)


def test_rounds_override_and_missing_file(tmp_path):
    assert load_scenario(CONFIGS / "fleet-small.yaml", rounds=2).rounds == 2
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [1, 2\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)


def test_fleet_asr_is_a_speech_recognition_fleet():
    scn = load_scenario(CONFIGS / "fleet-asr.yaml")
    assert scn.task == "asr" and scn.data.asr_corpus is not None
    assert scn.data.partition.kind == "voice" and len(scn.classes) >= 3
    assert {c.budget.keep for c in scn.classes} == {0.25, 0.5, 0.75}
    assert load_scenario(CONFIGS / "fleet-small.yaml").task == "kws"  # the default task


def test_unknown_task_is_named():
    data = _base()
    data["task"] = "translation"
    msg = _error(data)
    assert "task: unknown task 'translation'" in msg and "kws" in msg and "asr" in msg


def test_asr_needs_speakers_per_device_and_a_voice_partition():
    data = yaml.safe_load((CONFIGS / "fleet-asr.yaml").read_text())
    data["data"]["asr_corpus"] = {"voices": 1, "variants_per_voice": 3}
    msg = _error(data)
    assert "data.asr_corpus" in msg and "6 devices" in msg
    data = yaml.safe_load((CONFIGS / "fleet-asr.yaml").read_text())
    data["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.5}
    assert "task: asr fleet is partitioned by speaker" in _error(data)
    data = _base()
    data["data"]["asr_corpus"] = {"voices": 2}
    assert "only a task: asr scenario" in _error(data)


def test_kws_cache_keys_are_unchanged_by_the_asr_fields():
    """The optional asr fields (None for kws) stay out of the fingerprint: the kws scenarios keep the cache
    keys they had before the fields existed (values computed with that version), so cached warm models stay valid."""
    assert load_scenario(CONFIGS / "fleet-small.yaml").fingerprint("data", "warm") == "e939a17f5546"
    assert load_scenario(CONFIGS / "fleet-100.yaml").fingerprint("data", "warm") == "81a2f3455201"


def test_a_run_that_failed_before_its_first_round_can_simply_be_started_again(tmp_path):
    """A start-up failure (here a data folder that is not there) marks the run failed; running the same
    command again starts it again rather than asking for --resume of a run that never began."""
    import json

    from typer.testing import CliRunner

    from ldfleet.cli import app

    data = _base()
    data["data"] = {**data.get("data", {}), "source": str(tmp_path / "missing")}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    (tmp_path / "device-classes.yaml").write_text((CONFIGS / "device-classes.yaml").read_text())
    for _ in range(2):
        out = CliRunner().invoke(app, ["simulate", "--config", str(cfg), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
        text = " ".join(out.output.split())
        assert out.exit_code != 0 and "is not a folder" in text and "already holds a run" not in text, out.output
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    # a run that is running (another process, say) is refused and left as it is
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps({**info, "status": "running"}))
    out = CliRunner().invoke(app, ["simulate", "--config", str(cfg), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    assert out.exit_code != 0 and "already holds a run (running)" in " ".join(out.output.split())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "running"
