"""How commands fail: one error line on stderr, whatever the terminal width, with the user's text verbatim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_an_error_is_one_line_on_a_narrow_terminal_and_keeps_brackets(tmp_path: Path):
    # A long path with rich-markup-like brackets: wrapping or markup parsing would break what scripts grep.
    missing = tmp_path / "clips[1]" / ("a long folder name " * 6).strip()
    env = {**os.environ, "COLUMNS": "40"}
    done = subprocess.run(
        [sys.executable, "-c", "from ldfleet.cli import app; app()", "data", "info", str(missing)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]


def test_help_shows_the_defaults_written_in_option_help():
    # "[default: ...]" in a help string is rich markup unless escaped: the default would vanish from --help.
    env = {**os.environ, "COLUMNS": "300"}
    for command, default in ((["train"], "[default: kws 20, asr 24]"), (["simulate"], "[default: runs/<scenario name>]")):
        done = subprocess.run([sys.executable, "-c", "from ldfleet.cli import app; app()", *command, "--help"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and default in done.stdout, done.stdout


def test_train_refuses_a_run_folder_whose_config_is_corrupt(tmp_path: Path):
    # re-running `train` reads the run's own stage-3 setting first: a damaged config is a clear error, not a traceback
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.json").write_text('{"stage": "selector", "epoch": 1, "history": []}')
    (run / "train_config.json").write_text('{"task": "kws", "joint_epochs": ')
    done = subprocess.run([sys.executable, "-c", "from ldfleet.cli import app; app()", "train", "--data", str(tmp_path),
                           "--out", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot resume") and str(run) in done.stderr


def test_not_a_number_and_out_of_range_values_are_refused_naming_the_option(tmp_path: Path):
    """NaN passes every min/max range check (it compares false with everything): each float option
    refuses it; bad agent timings and expiries are named, without a traceback."""
    from typer.testing import CliRunner

    from ldfleet.cli import app

    runner = CliRunner()
    for args, words in [
        (["serve", "--run", str(tmp_path), "--max-seconds", "nan"], "must be a finite number"),
        (["agent", "--device-id", "a", "--device-class", "c", "--layer-ms", "1", "--front-end-ms", "inf"], "must be a finite number"),
        (["agent", "--device-id", "a", "--device-class", "c", "--layer-ms", "1,2,,3"], "comma-separated numbers"),
        (["agent", "--device-id", "a", "--device-class", "c", "--layer-ms", "1e308"], "--layer-ms: Input should be less than"),
        (["budget", "set", "c", "--keep", "0.5", "--expires-in", "1e12", "--db", f"sqlite:///{tmp_path / 'r.db'}"], "at most 3e+09"),
    ]:
        out = runner.invoke(app, args)
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and words in text and "Traceback" not in text, (args, out.output)


def test_reading_commands_do_not_create_a_registry_at_a_mistyped_path(tmp_path: Path):
    from typer.testing import CliRunner

    from ldfleet.cli import app

    missing = tmp_path / "typo" / "registry.db"
    for args in (["budget", "show"], ["budget", "history", "edge"], ["devices", "list"], ["registry", "rounds"]):
        out = CliRunner().invoke(app, [*args, "--db", f"sqlite:///{missing}"])
        assert out.exit_code == 2 and "no registry at" in " ".join(out.output.split()), (args, out.output)
    assert not missing.exists() and not missing.parent.exists()


def test_registry_commands_read_a_run_folder_or_say_what_is_wrong_with_it(tmp_path: Path):
    """`registry ... --run RUN` reads RUN/federate.json (a `federate` run) as it reads RUN/run.json; a damaged
    one is named, a password in its URL is never printed, and reading never creates a registry."""
    from typer.testing import CliRunner

    from ldfleet.cli import app

    runner = CliRunner()
    run = tmp_path / "fl1"
    run.mkdir()
    missing = tmp_path / "nowhere" / "registry.db"
    cases = [
        ('{"db_url": null, "run_id": "r1"}', "damaged"),
        ('{"db_url": "", "run_id": "r1"}', "damaged"),
        ('{"db_url": "sqlite:///x.db", "run_id": [1]}', "damaged"),
        ('{"db_url": "::::garbage", "run_id": "r1"}', "not a database URL"),
        ('{"db_url": "postgresql://alice:S3cretPW@127.0.0.1:1/test", "run_id": "r1"}', "cannot open the registry"),
        (f'{{"db_url": "sqlite:///{missing}", "run_id": "r1"}}', "no registry at"),
    ]
    for text, words in cases:
        (run / "federate.json").write_text(text)
        for args in (["registry", "rounds"], ["registry", "usage", "--source", "inference"]):
            out = runner.invoke(app, [*args, "--run", str(run)])
            said = " ".join(out.output.split())
            assert out.exit_code == 2 and words in said and "S3cretPW" not in said and "Traceback" not in said, (text, args, out.output)
    assert not missing.parent.exists()
    (run / "federate.json").write_text('{"db_url": "sqlite:///x.db", "run_id": "r1"}')
    out = runner.invoke(app, ["report", str(run)])
    assert out.exit_code == 2 and f"registry rounds --run {run}" in " ".join(out.output.split())
