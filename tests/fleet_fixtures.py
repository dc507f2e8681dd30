"""The tiny fleet's data, warm-up and local training, shared by the Flower tests.

One definition on purpose: the corpus and the warm model are cached by a fingerprint of these
sections, so every module that uses them reuses what the first one built.
"""

TINY_FLEET = {
    "data": {"corpus": {"voices": 3, "variants_per_voice": 2, "clips_per_word": 1, "unknown_per_speaker": 2,
                        "silence_clips": 12}},
    "warm": {"epochs": 1, "early_exit_epochs": 1, "batch_size": 16},
    "training": {"local_epochs": 1, "batch_size": 8},
}


import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

LDFLEET = str(Path(sys.executable).parent / "ldfleet")


def scenario_run(tmp_path_factory, name: str, scenario: dict) -> tuple[Path, Path, Path]:
    """A scenario YAML in a fresh temp folder: (config, run folder to create, the session's shared sim cache)."""
    import yaml

    tmp = tmp_path_factory.mktemp(name)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(scenario))
    return cfg, tmp / "run", tmp_path_factory.getbasetemp() / "sim-cache"


def ldfleet_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `ldfleet` command of this environment (output captured, Flower's telemetry off, wide tables)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run([LDFLEET, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower messages are created inside a task (a ServerApp run); stand in for one, as
    run_simulation does. Import it into a test module that builds Message objects by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
