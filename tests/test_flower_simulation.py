"""The learning plane on Flower's simulation engine (Ray): real ClientApp, ServerApp, registry, device state.

A tiny fleet (4 devices, tiny backbone, a few espeak-ng voices): budgets are put in each device's
local state with the agent's own storage; one device crashes mid-round; the run is then resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fleet_fixtures import TINY_FLEET
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.common import learning as L
from ldfleet.common.schemas import BudgetPolicy, DeviceProfile, utcnow
from ldfleet.simulations.scenario import parse_scenario

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

TINY = {
    "name": "tiny",
    "rounds": 2,
    "min_devices": 2,
    "classes": [
        {"name": "mcu", "count": 2, "profile": "mcu-class", "budget": {"keep": 0.25}},
        {"name": "rpi4", "count": 2, "profile": "rpi4", "budget": {"keep": 0.5}},
    ],
    **TINY_FLEET,
}


def tiny_scenario(**changes):
    return parse_scenario({**TINY, **changes}, "tiny", base_dir=ROOT / "configs")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Corpus + warm model (cached for the session) and a 4-device manifest with budgets in device state."""
    import torch

    from ldfleet.simulations.fleet import build_fleet, warm_device_caches

    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "sim-cache"
    run = tmp_path_factory.mktemp("flower-sim")
    scn = tiny_scenario()
    data = build_fleet(scn, run, cache, "sim-test", {}, say=lambda *_: None)
    data.manifest.save(run / L.MANIFEST_FILE)
    warm_device_caches(data.manifest, {})
    for i, dev in enumerate(data.manifest.devices):
        keep, k = (0.25, 2) if dev.device_class == "mcu" else (0.5, 4)
        version = 3 + i
        policy = BudgetPolicy(device_id=dev.device_id, version=version, source="class", device_class=dev.device_class,
                              policy_version=1, keep=keep, k=k, num_layers=8, issued_at=utcnow(), issued_by="test")
        profile = DeviceProfile(device_id=dev.device_id, device_class=dev.device_class, cores=1, memory_mb=512,
                                model_id="tiny", num_layers=8)
        save_device_state(dev.state_dir, DeviceState(device_id=dev.device_id, device_class=dev.device_class,
                                                     version=version, policy=policy, effective_k=k, profile=profile))
    return run, data


class CrashAt:
    def __init__(self, rnd: int, count: int) -> None:
        self.rnd, self.count, self.summaries = rnd, count, {}

    def before_round(self, rnd):
        from ldfleet.server.strategy import RoundPlan

        return RoundPlan(crash=self.count if rnd == self.rnd else 0)

    def after_round(self, rnd, summary):
        self.summaries[rnd] = summary


def _run(run: Path, data, rounds: int, hooks) -> object:
    from flwr.simulation import run_simulation

    from ldfleet.client.app import make_client_app
    from ldfleet.server.app import ServerSettings, make_server_app

    settings = ServerSettings(run_id="sim-test", run_dir=str(run), model_dir=data.manifest.model_dir,
                              db_url=f"sqlite:///{run / 'registry.db'}", num_rounds=rounds, min_available_nodes=4,
                              settle_timeout_s=0, round_timeout_s=300)
    outcome: list = []
    run_simulation(make_server_app(settings, hooks, outcome), make_client_app(str(run / L.MANIFEST_FILE)), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "error",
                                                 "log_to_driver": False, "include_dashboard": False}})
    assert outcome, "the ServerApp did not finish"
    return outcome[0]


def test_rounds_registry_crash_checkpoints_and_resume(fleet):
    from ldfleet.client.learning import frozen_model
    from ldfleet.server.checkpoints import checkpoint_rounds, load_checkpoint
    from ldfleet.server.registry.store import Registry
    from ldfleet.server.rounds import finished_rounds, metric_rows, rounds

    run, data = fleet
    hooks = CrashAt(2, 1)
    out = _run(run, data, 2, hooks)
    assert (out.first_round, out.last_round) == (1, 2)
    reg = Registry(f"sqlite:///{run / 'registry.db'}")
    rows = metric_rows(reg, "sim-test")
    devices = {d.device_id: d for d in data.manifest.devices}
    # round 1: every device trained and evaluated, with its own budget and policy version from its state
    r1 = [m for m in rows if m.round == 1]
    assert {(m.device_id, m.phase) for m in r1} == {(d, p) for d in devices for p in ("train", "eval")}
    for m in r1:
        state_version = 3 + [d.device_id for d in data.manifest.devices].index(m.device_id)
        expected_k = 2 if devices[m.device_id].device_class == "mcu" else 4
        assert m.policy_version == state_version and m.k == expected_k
        assert m.layer_usage is not None and len(m.layer_usage) == 8
        assert sum(m.layer_usage) == pytest.approx(expected_k) and m.mean_kept_layers == pytest.approx(expected_k)
        assert 0.0 <= m.accuracy <= 1.0 and m.num_examples > 0 and m.latency_ms > 0
    # round 2: one crash mid-round -> a failure row without metrics; the others are results
    r2 = [m for m in rows if m.round == 2]
    crashed = hooks.summaries[2]["crash_injected"]
    assert len(crashed) == 1
    fail = [m for m in r2 if m.phase == "train-failed"]
    assert [m.device_id for m in fail] == crashed
    assert fail[0].accuracy is None and fail[0].num_examples is None and fail[0].layer_usage is None
    assert not [m for m in r2 if m.phase == "train" and m.device_id in crashed]
    assert len([m for m in r2 if m.phase == "train"]) == 3
    assert "injected crash" in hooks.summaries[2]["failed"][0]["reason"]
    # traffic: only selector + head cross the network, far less than the full model
    model, _ = frozen_model(data.manifest.model_dir)
    sel = sum(t.numel() * t.element_size() for t in model.trainable_state("selector").values())
    tr = hooks.summaries[1]["traffic"]
    assert all(sel <= b < sel + 4096 for b in tr["received_bytes"].values())
    assert tr["full_model_bytes"] > 50 * max(tr["received_bytes"].values())
    # checkpoints after each round; the global selector changed
    assert checkpoint_rounds(run) == [1, 2]
    first = load_checkpoint(run, 1)
    initial = {k: v.numpy() for k, v in model.trainable_state("selector").items()}
    assert set(first) == set(initial)
    assert any(not np.allclose(first[k], initial[k]) for k in first)
    # resume: one more round, starting at 3; nothing written twice
    more = _run(run, data, 3, CrashAt(0, 0))
    assert (more.first_round, more.last_round) == (3, 3)
    assert finished_rounds(reg, "sim-test") == [1, 2, 3]
    assert [r.number for r in rounds(reg, "sim-test")] == [1, 2, 3]
    rows3 = metric_rows(reg, "sim-test")
    keys = [(m.round, m.device_id, m.phase) for m in rows3]
    assert len(keys) == len(set(keys))
    assert [(m.round, m.device_id, m.phase) for m in rows3 if m.round <= 2] == [(m.round, m.device_id, m.phase) for m in rows]
    reg.close()


def test_client_app_takes_the_budget_from_device_state_only(fleet, tmp_path):
    """Deployment mode (node config): a request that smuggles a budget does not change k."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from ldfleet.client.app import make_client_app
    from ldfleet.client.learning import frozen_model, pooled_split

    run, data = fleet
    dev = data.manifest.devices[0]
    # the device's own clips as a Speech Commands folder
    pool = pooled_split(data.manifest.data_dir, data.manifest.split_seed, "train")
    folder = tmp_path / "clips"
    for i in dev.train_indices + dev.test_indices:
        clip = pool.clips[i]
        (folder / clip.word).mkdir(parents=True, exist_ok=True)
        os.symlink(clip.path, folder / clip.word / clip.path.name)
    model, _ = frozen_model(data.manifest.model_dir)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in model.trainable_state("selector").items()})
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    app = make_client_app()
    ctx = Context(run_id=7, node_id=11, node_config={
        L.NODE_DEVICE_ID: dev.device_id, L.NODE_DEVICE_CLASS: dev.device_class, L.NODE_MODEL_DIR: data.manifest.model_dir,
        L.NODE_DATA_DIR: str(folder), L.NODE_STATE_DIR: dev.state_dir, L.NODE_CACHE_DIR: str(tmp_path / "cache"),
    }, state=RecordDict(), run_config={})
    msg = Message(RecordDict({L.ARRAYS: arrays, L.CONFIG: ConfigRecord({L.CFG_ROUND: 1, "k": 8, "keep": 1.0,
                                                                       L.CFG_FAULT: L.FAULT_CRASH})}),
                  dst_node_id=11, message_type=MessageType.TRAIN)
    reply = app(msg, ctx)
    assert not reply.has_error()
    m = reply.content.metric_records[L.METRICS]
    assert m[L.M_K] == 2 and m[L.M_POLICY_VERSION] == 3  # from the state, not the request's k=8
    assert sum(m[L.M_LAYER_USAGE]) == pytest.approx(2.0)
    assert set(reply.content.array_records[L.ARRAYS].keys()) == set(model.trainable_state("selector"))
    # fault injection is a simulation feature: a real device ignores it (it trained and replied)
    assert m[L.M_EXAMPLES] > 0
    assert list((tmp_path / "cache").glob("front-*.pt"))
