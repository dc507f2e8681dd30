"""The learning-plane contract: what the Flower ServerApp (server/) and ClientApp (client/) exchange.

Both sides import these names, so a record key, a config key or a metric name is spelled once.

Messages (Flower Message API):

* ``query``: the server asks a node who it is. Reply: ConfigRecord ``device`` (device id, class),
  MetricRecord ``metrics`` (policy version, k, number of layers).
* ``train``: ArrayRecord ``arrays`` (the global selector + its head, nothing else) and ConfigRecord
  ``config`` (round, local epochs, learning rates, seed; built per node). Reply: ArrayRecord
  ``arrays`` (the updated selector + head), MetricRecord ``metrics`` (``TRAIN_METRICS``), ConfigRecord
  ``device``.
* ``evaluate``: same request; reply without arrays.

The budget is never part of a request: a device reads it from its local device state, which its
agent keeps (``ldfleet.client.state``), and reports the policy version it used.

Simulated fleets are described by a :class:`FleetManifest` (``fleet.json`` in the run folder): in
simulation Flower gives a ClientApp only ``partition-id``, and the manifest maps it to a device, its
state folder and its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ldfleet.common.topics import DEVICE_CLASS_PATTERN, DEVICE_ID_PATTERN

# ---- record keys ------------------------------------------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
DEVICE = "device"

#: The learned strategy whose arrays (scorer + head) cross the network; the backbone never does.
TRAINED_STRATEGY = "selector"

# ---- node config (flower-supernode --node-config "key=value ...") ------------------------------
NODE_DEVICE_ID = "device-id"
NODE_DEVICE_CLASS = "device-class"
NODE_STATE_DIR = "state-dir"  # the agent's local device state (budget in force)
NODE_DATA_DIR = "data-dir"  # local clips, Speech Commands layout
NODE_MODEL_DIR = "model-dir"  # the frozen backbone + heads (a run folder), shipped out of band
NODE_CACHE_DIR = "cache-dir"  # where the device keeps its cached front ends
NODE_MANIFEST = "manifest"  # simulation: path of fleet.json
NODE_PARTITION_ID = "partition-id"  # simulation: set by Flower

# ---- per-node config sent by the server ----------------------------------------------------------
CFG_ROUND = "server-round"
CFG_LOCAL_EPOCHS = "local-epochs"
CFG_BATCH_SIZE = "batch-size"
CFG_SELECTOR_LR = "selector-lr"
CFG_HEAD_LR = "head-lr"
CFG_SEED = "seed"
#: Simulation-only fault injection, honoured only when the fleet manifest allows faults.
CFG_FAULT = "fault"
FAULT_CRASH = "crash"  # raise half-way through local training
#: Simulated straggler: the reply counts as arriving this many seconds late (no wall time is spent;
#: the server treats it as missing when that is past the round timeout).
CFG_DELAY_S = "delay-s"

# ---- reply metrics (MetricRecord: numbers and lists of numbers only) ---------------------------
M_EXAMPLES = "num-examples"
M_LOSS = "loss"
M_ACCURACY = "accuracy"  # kws: share of correct labels (an asr device does not send it)
M_WER = "wer"  # asr: word error rate, edits / reference words (may exceed 1)
M_CER = "cer"  # asr: character error rate
M_WORDS = "words"  # asr: reference words behind ``wer`` (weights the per-class WER: sum edits / sum words)
M_MEAN_LAYERS = "mean-layers"
M_LAYER_USAGE = "layer-usage"  # share of examples that ran each layer, length L
M_LATENCY_MS = "latency-ms"  # measured on the device, per example (front end + kept layers + head)
M_EXPECTED_LATENCY_MS = "expected-latency-ms"  # from the device's profile under its policy (-1: unknown)
M_POLICY_VERSION = "policy-version"  # version of the policy in force on the device (0: none)
M_K = "k"
M_NUM_LAYERS = "num-layers"
M_SECONDS = "seconds"  # wall time of the handler on the device
M_SIMULATED_DELAY_S = "simulated-delay-s"  # simulation only: how late this reply counts as arriving

TRAIN_METRICS = (
    M_EXAMPLES, M_LOSS, M_ACCURACY, M_MEAN_LAYERS, M_LAYER_USAGE, M_LATENCY_MS, M_EXPECTED_LATENCY_MS,
    M_POLICY_VERSION, M_K, M_NUM_LAYERS, M_SECONDS,
)
#: What replaces ``accuracy`` in the replies of a speech-recognition device.
ASR_METRICS = (M_WER, M_CER, M_WORDS)
EVAL_METRICS = TRAIN_METRICS


# ---- the simulated fleet -------------------------------------------------------------------------
MANIFEST_FILE = "fleet.json"
MANIFEST_SCHEMA = "ldfleet.fleet-manifest/1"


class ManifestDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    device_class: str = Field(pattern=DEVICE_CLASS_PATTERN)
    partition_id: int = Field(ge=0)
    state_dir: str
    cache_dir: str
    #: Indices into the pooled split (``FleetManifest.pool_split``) of the corpus.
    train_indices: list[int]
    test_indices: list[int]


class FleetManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["ldfleet.fleet-manifest/1"] = Field(MANIFEST_SCHEMA, alias="schema")
    run_id: str
    #: kws: ``data_dir`` is a Speech Commands-layout folder; asr: an audiofolder (or manifest).
    task: Literal["kws", "asr"] = "kws"
    data_dir: str
    split_seed: int = 0
    pool_split: Literal["train", "val", "test"] = "train"
    model_dir: str
    allow_faults: bool = False
    devices: list[ManifestDevice]

    def by_partition(self, partition_id: int) -> ManifestDevice:
        for dev in self.devices:
            if dev.partition_id == partition_id:
                return dev
        raise KeyError(f"no device with partition id {partition_id} in the fleet manifest")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(by_alias=True, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FleetManifest:
        return cls.model_validate_json(Path(path).read_text())


def array_bytes(arrays: object) -> int:
    """Payload bytes of a Flower ArrayRecord (the serialized tensors, what dominates the wire)."""
    return int(sum(len(a.data) for a in arrays.values()))  # type: ignore[attr-defined]
