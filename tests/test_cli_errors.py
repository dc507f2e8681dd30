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
