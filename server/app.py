"""The fleet's Flower ServerApp: federated fine-tuning of the selector + head, resumable.

``run_server`` does the work for both ways of running:

* a real fleet: ``serverapp = "ldfleet.server.app:app"`` in a Flower app, settings from the run
  config (``run-id``, ``run-dir``, ``model-dir``, ``db-url``, ``num-rounds``, ...; see
  :meth:`ServerSettings.from_run_config`);
* a simulation: :func:`make_server_app` with settings and hooks given in code.

The initial global arrays are the selector + head of the model in ``model-dir``; with ``resume``
(the default) a run continues after the newest round that the registry marks finished and that has
a checkpoint, after discarding rounds that never finished, so no round is written twice.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ldfleet.common import learning as L

log = logging.getLogger("ldfleet.server.app")

NPY_HEADER_BYTES = 128  # numpy .npy v1 header of a small-rank array, what Flower's Array carries per tensor


@dataclass
class ServerSettings:
    run_id: str
    run_dir: str
    model_dir: str
    db_url: str = ""
    num_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 1
    min_evaluate_nodes: int = 1
    min_available_nodes: int = 1
    local_epochs: int = 1
    batch_size: int = 16
    selector_lr: float = 5e-3
    head_lr: float = 3e-3
    seed: int = 0
    round_timeout_s: float = 600.0
    settle_timeout_s: float = 5.0
    wait_nodes_s: float = 120.0
    resume: bool = True

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> ServerSettings:
        """Settings from a Flower run config (keys spelled with dashes, e.g. ``num-rounds``)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in rc and rc[key] != "":
                raw = rc[key]
                typ = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
                values[f.name] = (str(raw).lower() in ("1", "true", "yes")) if typ is bool and isinstance(raw, str) else typ(raw)
        missing = [k for k in ("run_id", "run_dir", "model_dir") if k not in values]
        if missing:
            raise ValueError(f"run config lacks {', '.join(m.replace('_', '-') for m in missing)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of a state dict sent as Flower Arrays (.npy per tensor: header + data)."""
    return int(sum(NPY_HEADER_BYTES + t.numel() * t.element_size() for t in state.values()))


def full_model_bytes(model: Any) -> int:
    """What full-model FedAvg of the same network would send per client and round: every parameter
    and buffer of the backbone and the task head, once each (module aliases are not counted twice)."""
    tensors: dict[int, Any] = {}
    for module in (model.runner.backbone, model.heads["base"]):
        for t in list(module.parameters()) + list(module.buffers()):
            tensors[id(t)] = t
    return int(sum(NPY_HEADER_BYTES + t.numel() * t.element_size() for t in tensors.values()))


@dataclass
class RunOutcome:
    first_round: int
    last_round: int
    discarded: list[int]
    arrays: dict[str, np.ndarray]


def run_server(grid: Grid, settings: ServerSettings, hooks: Any = None) -> RunOutcome:
    """Run (or resume) the federated rounds of ``settings.run_id`` on ``grid``."""
    from ldfleet.common.model.checkpoint import load_model
    from ldfleet.server.checkpoints import checkpoint_rounds, load_checkpoint
    from ldfleet.server.registry.store import Registry
    from ldfleet.server.rounds import discard_unfinished, finished_rounds
    from ldfleet.server.strategy import FleetFedAvg, to_record

    model = load_model(settings.model_dir)
    initial = {k: v.detach().cpu().numpy().copy() for k, v in model.trainable_state(L.TRAINED_STRATEGY).items()}
    full_bytes = full_model_bytes(model)
    registry = Registry(settings.db_url) if settings.db_url else None
    try:
        first, discarded = 1, []
        if settings.resume:
            done = set(finished_rounds(registry, settings.run_id)) if registry is not None else None
            ckpts = [r for r in checkpoint_rounds(settings.run_dir) if done is None or r in done]
            last = max(ckpts) if ckpts else 0
            # a round is complete when finished in the registry AND checkpointed; both must run 1..last
            while last and done is not None and not all(r in done for r in range(1, last + 1)):
                last -= 1
            if last:
                initial = load_checkpoint(settings.run_dir, last)
                first = last + 1
                log.info("resuming %s after round %d", settings.run_id, last)
            if registry is not None:
                discarded = discard_unfinished(registry, settings.run_id, last)
                if discarded:
                    log.info("discarded unfinished round(s) %s of %s", discarded, settings.run_id)
        strategy = FleetFedAvg(
            global_template=initial,
            run_id=settings.run_id,
            run_dir=settings.run_dir,
            registry=registry,
            num_layers=model.num_layers,
            fraction_train=settings.fraction_train,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=settings.min_train_nodes,
            min_evaluate_nodes=settings.min_evaluate_nodes,
            min_available_nodes=settings.min_available_nodes,
            train_settings={
                L.CFG_LOCAL_EPOCHS: settings.local_epochs, L.CFG_BATCH_SIZE: settings.batch_size,
                L.CFG_SELECTOR_LR: settings.selector_lr, L.CFG_HEAD_LR: settings.head_lr,
            },
            seed=settings.seed,
            round_timeout_s=settings.round_timeout_s,
            settle_timeout_s=settings.settle_timeout_s,
            wait_nodes_s=settings.wait_nodes_s,
            full_model_bytes=full_bytes,
            hooks=hooks,
        )
        del model
        if first > settings.num_rounds:
            return RunOutcome(first, first - 1, discarded, initial)
        result = strategy.start(grid, to_record(initial), num_rounds=settings.num_rounds, first_round=first)
        arrays = strategy.current if result.arrays is not None else initial
        return RunOutcome(first, settings.num_rounds, discarded, arrays)
    finally:
        if registry is not None:
            registry.close()


def make_server_app(settings: ServerSettings, hooks: Any = None, outcome: list | None = None) -> ServerApp:
    """A ServerApp bound to settings given in code (simulations); ``outcome`` receives the RunOutcome."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, settings, hooks)
        if outcome is not None:
            outcome.append(result)

    return app


#: The ServerApp of a real fleet (``serverapp = "ldfleet.server.app:app"``): settings from the run config.
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(dict(context.run_config))
    Path(settings.run_dir).mkdir(parents=True, exist_ok=True)
    run_server(grid, settings)
