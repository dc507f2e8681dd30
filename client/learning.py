"""What a device does in a federated round, without Flower: read its budget, fine-tune, evaluate.

* The budget comes from the local device state only (``ldfleet.client.state``, kept by the agent
  after validating the controller's policy); no budget is ever taken from a training request.
* The backbone is frozen, so the always-run front end of the device's clips is computed once and
  cached on disk (``cache_dir``), keyed by the model's weights; rounds then run only encoder layers.
* Training fine-tunes the selector and its head under the device's k (straight-through top-k gates,
  constant learning rate); evaluation runs the hard top-k masks and times them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldfleet.client.state import load_device_state
from ldfleet.common.budget import layers_for_keep
from ldfleet.common.learning import TRAINED_STRATEGY
from ldfleet.common.model.checkpoint import WEIGHTS, load_model
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.metrics import error_counts, error_rates, score
from ldfleet.common.front_cache import FrontEndCache, cache_front_ends

log = logging.getLogger("ldfleet.client.learning")

CACHE_PREFIX = "front-"


class DeviceCrash(RuntimeError):
    """Raised by fault injection: the device 'crashes' half-way through local training."""


# ---- budget from the local device state ---------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    k: int
    num_layers: int
    version: int  # version of the policy in force on the device (0: none received: all layers)
    keep: float | None = None
    latency_ms: float | None = None
    rtf: float | None = None
    expected_latency_ms: float | None = None

    @property
    def keep_ratio(self) -> float:
        return self.k / self.num_layers


def read_budget(state_dir: str | os.PathLike[str] | None, num_layers: int) -> Budget:
    """The budget in force on this device, from its local state (all layers when it has none).

    ``effective_k`` is the agent's resolution against the device's own profile. If that profile
    describes a model with another layer count, a keep fraction is re-applied to this model's L;
    a latency target cannot be, and k is clipped to L.
    """
    state = load_device_state(state_dir) if state_dir else None
    if state is None or state.version == 0 or state.policy is None:
        return Budget(k=num_layers, num_layers=num_layers, version=0 if state is None else state.version)
    policy = state.policy
    k = state.effective_k or num_layers
    if state.num_layers is not None and state.num_layers != num_layers:
        if policy.keep is not None:
            k = layers_for_keep(policy.keep, num_layers)
        log.warning("device %s: profile has %s layers, model has %d; using k=%d",
                    state.device_id, state.num_layers, num_layers, min(k, num_layers))
    k = max(1, min(int(k), num_layers))
    return Budget(
        k=k, num_layers=num_layers, version=state.version, keep=policy.keep, latency_ms=policy.latency_ms,
        rtf=policy.rtf, expected_latency_ms=state.expected_latency_ms,
    )


# ---- the frozen model, once per process -----------------------------------------------------------

_MODELS: dict[tuple[str, float, int], tuple[DynamicModel, str]] = {}


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of the model weights: keys the front-end cache to the exact backbone."""
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def frozen_model(model_dir: str | os.PathLike[str]) -> tuple[DynamicModel, str]:
    """The device's model (loaded once per process) and its fingerprint."""
    path = Path(model_dir).resolve()
    st = (path / WEIGHTS).stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = (load_model(path), model_fingerprint(path))
    return _MODELS[key]


def load_global(model: DynamicModel, arrays: dict[str, np.ndarray]) -> None:
    """Put the global selector + head into the model (refuses anything else: the backbone is local)."""
    allowed = set(model.trainable_state(TRAINED_STRATEGY))
    unexpected = set(arrays) - allowed
    if unexpected:
        raise ValueError(f"refusing arrays outside the selector and its head: {sorted(unexpected)[:3]}")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).clone() for k, v in arrays.items()}
    model.load_state_dict(state, strict=False)
    absent = allowed - set(arrays)
    if absent:
        log.debug("global arrays lack %d selector/head tensors; keeping local ones", len(absent))


def trained_arrays(model: DynamicModel) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.trainable_state(TRAINED_STRATEGY).items()}


# ---- cached front ends ---------------------------------------------------------------------------


@dataclass
class LocalData:
    train: FrontEndCache
    test: FrontEndCache
    front_ms: float  # measured front-end time per example when the cache was made


def _cache(model: DynamicModel, data: Dataset, batch_size: int = 64) -> tuple[FrontEndCache, float]:
    """The dataset's cached front ends and the measured front-end ms per example."""
    if len(data) == 0:
        raise ValueError("a device needs at least one clip")
    t0 = time.perf_counter()
    cache = cache_front_ends(model, data, batch_size)
    return cache, 1000 * (time.perf_counter() - t0) / len(data)


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".front.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def local_data(
    model: DynamicModel,
    fingerprint: str,
    cache_dir: str | os.PathLike[str] | None,
    datasets: Callable[[], tuple[Dataset, Dataset]],
) -> LocalData:
    """The device's cached front ends, computed from ``datasets()`` (train, test) when not on disk."""
    path = Path(cache_dir) / f"{CACHE_PREFIX}{fingerprint[:16]}.pt" if cache_dir else None
    if path is not None and path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return LocalData(_from_blob(blob, "train"), _from_blob(blob, "test"), float(blob["front_ms"]))
        except Exception as exc:  # noqa: BLE001 - a torn or old cache is recomputed
            log.warning("front-end cache %s unusable (%s); recomputing", path, exc)
    train_ds, test_ds = datasets()
    train, ms_a = _cache(model, train_ds)
    test, ms_b = _cache(model, test_ds)
    front_ms = (ms_a * len(train) + ms_b * len(test)) / (len(train) + len(test))
    if path is not None:
        _save_atomic({**_to_blob(train, "train"), **_to_blob(test, "test"), "front_ms": torch.tensor(front_ms)}, path)
    return LocalData(train, test, front_ms)


def _to_blob(cache: FrontEndCache, prefix: str) -> dict:
    return {f"{prefix}_hidden": cache.hidden, f"{prefix}_features": cache.features, f"{prefix}_offsets": cache.offsets,
            f"{prefix}_texts": list(cache.texts)}


def _from_blob(blob: dict, prefix: str) -> FrontEndCache:
    """A cache saved by :func:`_to_blob` (KeyError for an older, padded one: it is recomputed)."""
    return FrontEndCache(blob[f"{prefix}_hidden"], blob[f"{prefix}_features"], blob[f"{prefix}_offsets"],
                         list(blob[f"{prefix}_texts"]))


# ---- the device's clips ------------------------------------------------------------------------------

_POOLS: dict[tuple[str, int, str, str], Dataset] = {}


def load_pool_splits(data_dir: str | os.PathLike[str], seed: int, task: str = "kws") -> dict[str, Dataset]:
    """Train/val/test of a fleet's corpus: a Speech Commands folder (kws, ``ClipDataset`` with
    ``speakers`` and ``labels``) or an audiofolder / manifest (asr, ``UtteranceDataset`` with
    ``speakers``, its own split column when it has one). Raises ValueError on an unknown task."""
    if task == "asr":
        from ldfleet.common.data.transcribed import load_transcribed_splits

        return dict(load_transcribed_splits(data_dir, seed=seed))
    if task != "kws":
        raise ValueError(f"unknown task {task!r} (kws or asr)")
    from ldfleet.common.data.folder import load_splits

    return load_splits(data_dir, seed=seed)


def pooled_split(data_dir: str, seed: int, split: str, task: str = "kws") -> Dataset:
    """One split of a corpus, loaded once per process (simulated devices share it)."""
    key = (str(Path(data_dir).resolve()), seed, split, task)
    if key not in _POOLS:
        _POOLS[key] = load_pool_splits(data_dir, seed, task)[split]
    return _POOLS[key]


def folder_datasets(data_dir: str | os.PathLike[str], test_share: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A real device's clips (any Speech Commands-layout folder), split per clip into train/test.

    A device hears few speakers, so its local test clips are its own speakers' other clips.
    """
    from ldfleet.common.data.dataset import ClipDataset
    from ldfleet.common.data.folder import scan_folder

    clips = scan_folder(data_dir)
    data = ClipDataset(clips)
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = max(1, int(round(test_share * len(data)))) if len(data) > 1 else 0
    return data.subset(sorted(order[n_test:].tolist())), data.subset(sorted(order[:n_test].tolist()) or [0])


# ---- one round's work -------------------------------------------------------------------------------


@dataclass
class LocalResult:
    num_examples: int
    loss: float
    accuracy: float | None  # kws: share of correct labels; None on an asr device
    mean_layers: float
    layer_usage: list[float]
    latency_ms: float
    seconds: float
    wer: float | None = None  # asr: word error rate (edits / reference words; may exceed 1); None for kws
    cer: float | None = None  # asr: character error rate
    words: int = 0  # asr: reference words behind ``wer``


def _task_scores(task: str, predictions: list[str], references: list[str]) -> dict[str, float | int | None]:
    """kws: ``accuracy``; asr: ``wer``, ``cer`` and the reference ``words`` (accuracy None)."""
    if task == "kws":
        return {"accuracy": score(task, predictions, references)["accuracy"]}
    c = error_counts(predictions, references)
    return {"accuracy": None, **error_rates(c), "words": int(c["words"])}


def train_selector(
    model: DynamicModel,
    data: LocalData,
    k: int,
    *,
    epochs: int = 1,
    batch_size: int = 16,
    selector_lr: float = 3e-3,
    head_lr: float = 2e-3,
    seed: int = 0,
    noise: float = 0.5,
    crash_midway: bool = False,
) -> LocalResult:
    """Fine-tune the selector + its head on the local front ends under budget k (backbone frozen).

    A device runs a handful of steps per round, so unlike central training (``train_strategy_epoch``,
    whose 20-step warm-up would leave the learning rate near zero here) the rate is constant; the
    Gumbel exploration noise on the layer scores fades from ``noise`` to 0 over the local steps.
    Straight-through top-k gates keep exactly k layers in the forward pass.
    """
    start = time.perf_counter()
    choice = model.strategy(TRAINED_STRATEGY)
    head = model.head_for(TRAINED_STRATEGY)
    model.runner.eval()  # frozen backbone: no dropout, no gradients into its weights
    model.runner.requires_grad_(False)
    choice.train()
    head.train()
    optimizer = torch.optim.AdamW(
        [{"params": head.parameters(), "lr": head_lr}, {"params": choice.parameters(), "lr": selector_lr}], weight_decay=0.01
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = max(1, epochs * steps_per_epoch)
    done = 0
    loss_sum = 0.0
    seen = 0
    predictions: list[str] = []
    references: list[str] = []
    usage = torch.zeros(model.num_layers)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum, seen, predictions, references = 0.0, 0, [], []  # report the last epoch
        usage.zero_()
        for s in range(steps_per_epoch):
            front, texts = data.train.batch(order[s * batch_size:(s + 1) * batch_size])
            gates = choice.gates(front, k, tau=1.0, noise_scale=noise * (1.0 - done / total))
            logits = head.logits(model.runner.run_layers_gated(front, gates), front.frame_mask)
            loss = head.loss_from_logits(logits, front.frame_mask, head.targets(texts))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 5.0)
            optimizer.step()
            done += 1
            if crash_midway and done >= max(1, total // 2):  # before the reply, whatever the step count
                raise DeviceCrash(f"injected crash after {done}/{total} local steps")
            loss_sum += loss.item() * len(texts)
            predictions += head.decode(logits.detach(), front.frame_mask)
            references += texts
            seen += len(texts)
            usage += (gates.detach() > 0.5).float().sum(0)
    model.eval()
    shares = (usage / max(1, seen)).tolist()
    return LocalResult(
        num_examples=n,
        loss=loss_sum / max(1, seen),
        **_task_scores(model.task, predictions, references),
        mean_layers=float(sum(shares)),
        layer_usage=[float(u) for u in shares],
        latency_ms=measure_latency(model, data.test, k, data.front_ms),
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def measure_latency(model: DynamicModel, cache: FrontEndCache, k: int, front_ms: float, max_examples: int = 32) -> float:
    """ms per example of the hard-mask path on this device: cached front-end time + selector + layers + head."""
    model.eval()
    n = min(len(cache), max_examples)
    front, _ = cache.batch(torch.arange(n))
    model.classify(front, TRAINED_STRATEGY, k)  # warm-up
    t0 = time.perf_counter()
    model.classify(front, TRAINED_STRATEGY, k)
    return front_ms + 1000 * (time.perf_counter() - t0) / max(1, n)


@torch.inference_mode()
def evaluate_selector(model: DynamicModel, data: LocalData, k: int, batch_size: int = 64) -> LocalResult:
    """Accuracy, loss and per-layer usage of the selector on the local test clips under budget k."""
    start = time.perf_counter()
    model.eval()
    cache = data.test
    head = model.head_for(TRAINED_STRATEGY)
    predictions: list[str] = []
    loss_sum = 0.0
    usage = torch.zeros(model.num_layers)
    for s in range(0, len(cache), batch_size):
        front, texts = cache.batch(torch.arange(s, min(s + batch_size, len(cache))))
        out = model.classify(front, TRAINED_STRATEGY, k)
        loss_sum += float(head.loss_from_logits(out.logits, out.frame_mask, head.targets(texts))) * len(texts)
        predictions += head.decode(out.logits, out.frame_mask)
        usage += out.keep.float().sum(0)
    n = max(1, len(cache))
    shares = (usage / n).tolist()
    return LocalResult(
        num_examples=len(cache),
        loss=loss_sum / n,
        **_task_scores(model.task, predictions, cache.texts),
        mean_layers=float(sum(shares)),
        layer_usage=shares,
        latency_ms=measure_latency(model, cache, k, data.front_ms),
        seconds=time.perf_counter() - start,
    )
