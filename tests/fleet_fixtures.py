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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower messages are created inside a task (a ServerApp run); stand in for one, as
    run_simulation does. Import it into a test module that builds Message objects by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
