"""Centralised training of a dynamic model, in resumable stages (the epochs are in :mod:`.train` and
:mod:`.joint_train`).

1. ``backbone``: backbone + base head under LayerDrop.
2. ``early_exit``, ``static``, ``selector``: each strategy on the frozen backbone (``set_table``: static
   and selector fitted on a table of layer-set losses first, :mod:`.set_fit`).
3. ``joint`` (``joint_epochs``; ``asr`` default 6, ``kws`` 0): the encoder layers fine-tuned with every
   strategy's head on the layer sets it runs; front end and scorers frozen, one encoder for all.
4. ``depth`` (``depth_clips``; ``asr`` default 4096, ``kws`` 0): the ``adaptive`` strategy's depth
   chooser fitted on the selector's errors at every depth, then ``confident_exit``'s thresholds
   calibrated on the validation clips (:mod:`.depth_fit`): fits after the last epoch, each logged as
   stage "depth" (``fit``: ``depth`` or ``confident_exit``); the run's progress stays at its last
   trained stage, and any epoch trained later (more joint epochs) makes both fit again.

After every epoch (and every set-table fit) the run folder holds the model, the optimiser (named by
its stage) and the progress, so an interrupted ``ldfleet train`` resumes where it stopped; given
more ``joint_epochs``, a finished run goes on with stage 3.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.data import Dataset

from .depth_fit import calibrate_exits, fit_depth
from .front_cache import FrontEndCache, add_teacher, cache_front_ends
from .joint_train import joint_optimizer, train_joint_epoch
from .model.backbone import load_backbone
from .model.checkpoint import load_model, save_model
from .model.dynamic import DynamicModel
from .set_fit import TABLE_STRATEGIES, fit_from_tables, set_loss_table
from .train import (
    DEFAULT_DEPTH_CLIPS, DEFAULT_JOINT_EPOCHS, StepCallback, TrainConfig, backbone_optimizer, new_head, prefixed,
    strategy_optimizer, train_backbone_epoch, train_strategy_epoch, validate,
)

STAGES = ("backbone", "early_exit", "static", "selector", "joint")
STRATEGY_STAGES = STAGES[1:4]  # stage 2: one strategy each, on the frozen backbone
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
OPTIM_FILE = "optimizer.pt"


@dataclass
class TrainState:
    stage: str = STAGES[0]
    epoch: int = 0  # epochs finished in `stage`
    done: bool = False
    history: list[dict] = field(default_factory=list)


def joint_epochs_for(cfg: TrainConfig, saved: dict | None = None) -> int:
    """Stage-3 epochs: ``cfg.joint_epochs`` when given; else a resumed run's own (``saved``: its config
    as written; 0 for runs older than stage 3), so re-running a finished run adds nothing; else no
    stage 3 with ``from_run`` (stage 2 compares options on the source's encoder as it is) and the
    task's default otherwise (``DEFAULT_JOINT_EPOCHS``)."""
    if cfg.joint_epochs is not None:
        return cfg.joint_epochs
    if saved is not None:
        return int(saved.get("joint_epochs") or 0)
    return 0 if cfg.from_run else DEFAULT_JOINT_EPOCHS.get(cfg.task, 0)


def depth_clips_for(cfg: TrainConfig, saved: dict | None = None) -> int:
    """Stage-4 training clips: ``cfg.depth_clips`` when given; else a resumed run's own (``saved``: its
    config as written), else the task's default (``DEFAULT_DEPTH_CLIPS``; also for a run from before
    stage 4, which then gets one)."""
    if cfg.depth_clips is not None:
        return cfg.depth_clips
    if saved is not None and saved.get("depth_clips") is not None:
        return int(saved["depth_clips"])
    return DEFAULT_DEPTH_CLIPS.get(cfg.task, 0)


def read_progress(run: Path) -> tuple[dict, TrainState]:
    """A run folder's saved config (as written: a dict) and progress; ValueError when either file is not
    what `ldfleet train` writes."""
    cfg, state = (json.loads((run / name).read_text()) for name in (CONFIG_FILE, STATE_FILE))
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise ValueError(f"{CONFIG_FILE} and {STATE_FILE} must hold JSON objects")
    return cfg, TrainState(**state)


def saved_progress(run: str | Path) -> tuple[dict, TrainState] | None:
    """What ``Trainer`` resumes from in ``run`` (see ``read_progress``), or None when ``run`` holds no run
    yet. Raises ValueError "cannot resume RUN: ..." when its progress files are unreadable."""
    run = Path(run)
    if not (run / STATE_FILE).exists():
        return None
    try:
        return read_progress(run)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a JSON object that is not a run's progress
        raise ValueError(f"cannot resume {run}: {exc}") from exc


def source_progress(source: str | Path) -> tuple[dict, TrainState]:
    """The saved config and progress of a ``--from-run`` source; ValueError naming ``source`` when it
    is not a run folder or its progress files are damaged."""
    source = Path(source)
    if not (source / STATE_FILE).is_file() or not (source / CONFIG_FILE).is_file():
        raise ValueError(f"{source} is not a run made by `ldfleet train` (no {STATE_FILE} or {CONFIG_FILE})")
    try:
        return read_progress(source)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{source} is not a usable run: {exc}") from exc


def strategies_trained(saved: dict, state: TrainState) -> bool:
    """Whether a run (its saved config and progress) has finished stage 2, so every strategy can run."""
    return state.done or state.stage == "joint" or (state.stage == "selector" and state.epoch >= saved.get("strategy_epochs", 0))


def set_table_rows(train_size: int, val_size: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The clips stage 2's set tables are built on: ``n`` random training clips and a quarter as many
    validation clips (at least one), drawn with ``seed``: ``{"train": [n], "val": [n // 4]}`` indices."""
    gen = torch.Generator().manual_seed(seed)
    return {"train": torch.randperm(train_size, generator=gen)[:n],
            "val": torch.randperm(val_size, generator=gen)[: max(1, n // 4)]}


def new_model(cfg: TrainConfig, backbone, head) -> DynamicModel:
    """A model with fresh strategies per ``cfg``; a budget-conditioned selector gets the per-k static
    ranking, its fair baseline."""
    return DynamicModel(backbone, head, cfg.selector_hidden, cfg.selector_budget, static_budget=cfg.selector_budget)


def stage2_start(cfg: TrainConfig) -> tuple[DynamicModel, TrainState]:
    """A model with the backbone and base head of ``cfg.from_run`` (whose stage 1 must be finished) and
    fresh strategies built with ``cfg``'s options, and a state that starts at the first stage-2 stage.

    Lets stage-2 options (``selector_budget``, ``distill``, ``oracle_weight``) be compared on one
    trained encoder without training it again. ``cfg`` takes the source's task, token unit and
    vocabulary; the history of what made the encoder (stage 1, and stage 3 if the source ran it) is
    carried over. Raises ValueError when the source is not a run of
    an SSL encoder, its stage 1 is unfinished or its task differs.
    """
    source = Path(cfg.from_run)
    src_cfg, src_state = source_progress(source)
    try:
        model = load_model(source)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # missing or damaged weights or meta
        raise ValueError(f"{source}: its model cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if type(model) is not DynamicModel:
        raise ValueError(f"{source} is a {type(model).__name__} run; --from-run takes the SSL encoders' runs")
    if src_state.stage == "backbone" and src_state.epoch < src_cfg.get("epochs", 0):
        raise ValueError(f"{source}: stage 1 is unfinished ({src_state.epoch} of {src_cfg.get('epochs')} epochs)")
    if model.task != cfg.task:
        raise ValueError(f"{source} is a {model.task} run, not {cfg.task}")
    for name in ("backbone", "family", "epochs", "layerdrop", "lr", "labels", "vocab", "tokens"):
        setattr(cfg, name, src_cfg.get(name, getattr(cfg, name)))
    fresh = new_model(cfg, model.runner.backbone, model.heads["base"])
    history = [h for h in src_state.history if h.get("stage") in ("backbone", "joint")]  # what made this encoder
    return fresh, TrainState(stage=STAGES[1], history=history)


class Trainer:
    """Runs the stages into ``run_dir``, picking up from ``train_state.json`` when present."""

    def __init__(self, run_dir: str | Path, train: Dataset, val: Dataset, cfg: TrainConfig, log=print):
        self.run = Path(run_dir)
        self.train_data, self.val_data, self.cfg, self.log = train, val, cfg, log
        self.run.mkdir(parents=True, exist_ok=True)
        saved = saved_progress(self.run)
        if saved is not None:
            saved_cfg, self.state = saved
            known = {k: v for k, v in saved_cfg.items() if k in TrainConfig.__dataclass_fields__}
            self.cfg = TrainConfig(**{**known, "epochs": cfg.epochs, "strategy_epochs": cfg.strategy_epochs,
                                       "joint_epochs": joint_epochs_for(cfg, saved_cfg),
                                       "depth_clips": depth_clips_for(cfg, saved_cfg)})
            changed = {k: getattr(self.cfg, k) for k in ("joint_epochs", "depth_clips") if saved_cfg.get(k, 0) != getattr(self.cfg, k)}
            if changed:  # stage 3 or 4 added or changed: record it
                (self.run / CONFIG_FILE).write_text(json.dumps({**saved_cfg, **changed}, indent=2))
            self.model = load_model(self.run)
            self.log(f"resuming {self.run}: stage {self.state.stage}, {self.state.epoch} epoch(s) done")
        else:
            self.cfg = cfg = replace(cfg, joint_epochs=joint_epochs_for(cfg), depth_clips=depth_clips_for(cfg))
            torch.manual_seed(cfg.seed)
            if cfg.from_run:
                self.model, self.state = stage2_start(cfg)
            else:
                backbone = load_backbone(cfg.backbone, cfg.family)
                self.model = new_model(cfg, backbone, new_head(cfg, backbone.config.hidden_size, train))
                self.state = TrainState()
            (self.run / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))

    @property
    def metric(self) -> str:
        """The task's headline score in logs: accuracy (kws) or WER (asr)."""
        return "accuracy" if self.model.task == "kws" else "wer"

    def epochs_for(self, stage: str) -> int:
        return {"backbone": self.cfg.epochs, "joint": self.cfg.joint_epochs}.get(stage, self.cfg.strategy_epochs)

    def _save(self, optimizer: torch.optim.Optimizer | None) -> None:
        save_model(self.model, self.run, {"train_config": asdict(self.cfg)})
        if optimizer is not None:
            torch.save({"stage": self.state.stage, "state": optimizer.state_dict()}, self.run / OPTIM_FILE)
        tmp = self.run / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(self.run / STATE_FILE)

    def _from_table(self, stage: str) -> bool:
        """Whether ``stage``'s scorer is fitted on a set table (its epochs then train only its head)."""
        return bool(self.cfg.set_table) and stage in TABLE_STRATEGIES

    def _fit_pending(self, stage: str) -> bool:
        return self._from_table(stage) and not self._table_fitted(stage)

    def _table_fitted(self, stage: str) -> bool:
        return any(h["stage"] == stage and h.get("fit") == "set_table" for h in self.state.history)

    def _optimizer(self, stage: str) -> torch.optim.Optimizer:
        if stage == "backbone":
            opt = backbone_optimizer(self.model, self.cfg)
        elif stage == "joint":
            opt = joint_optimizer(self.model, self.cfg)
        else:
            opt = strategy_optimizer(self.model, stage, self.cfg, learn_scores=not self._from_table(stage))
        saved = torch.load(self.run / OPTIM_FILE) if self.state.epoch > 0 and (self.run / OPTIM_FILE).exists() else None
        if saved is not None and "stage" not in saved:  # written before files named their stage
            saved = {"stage": stage, "state": saved}
        if saved is not None and saved["stage"] == stage:  # not a previous stage's (killed before the state was saved)
            opt.load_state_dict(saved["state"])
        return opt

    def _set_tables(self, train_cache: FrontEndCache, val_cache: FrontEndCache, on_step: StepCallback | None):
        """Layer-set loss tables on ``cfg.set_table`` random training clips and a quarter as many
        validation clips (see :mod:`.set_fit`)."""
        rows = set_table_rows(len(train_cache), len(val_cache), self.cfg.set_table, self.cfg.seed)

        def progress(split: str):
            return partial(on_step, f"set table ({split})") if on_step else None

        return (set_loss_table(self.model, train_cache, rows["train"], on_item=progress("train")),
                set_loss_table(self.model, val_cache, rows["val"], on_item=progress("val")))

    def _fit_from_tables(self, stage: str, tables, val_cache: FrontEndCache) -> None:
        fitted = fit_from_tables(self.model, stage, *tables, seed=self.cfg.seed, log=lambda _msg: None)
        k = self.model.k_for(0.5)
        stats = {"stage": stage, "epoch": 0, "fit": "set_table", "best_epoch": fitted["best_epoch"],
                 "val_chosen_loss": fitted["val_chosen_loss"], "train_chosen_loss": fitted["train_chosen_loss"],
                 **({"corrected": fitted["corrected"]} if "corrected" in fitted else {}),
                 **prefixed("val_", validate(self.model, val_cache, stage, k))}
        self.state.history.append(stats)
        self._save(None)
        metric = self.metric
        self.log(f"{stage} fitted on the set table: val {metric} {stats['val_' + metric]:.3f} at k={k}; "
                 f"val loss of chosen sets per k {', '.join(f'{size}: {v:.3f}' for size, v in fitted['val_chosen_loss'].items())}"
                 + (f"; per-clip corrections kept at k = {[k for k, on in fitted['corrected'].items() if on]}" if "corrected" in fitted else ""))

    # ---- fit: the stages in order, each a list of phases -----------------------------------

    def fit(self, on_step: StepCallback | None = None) -> TrainState:
        """Run every unfinished stage; returns the final state (``done``)."""
        self._train_cache = self._val_cache = self._tables = None
        self.state.done = False  # a finished run given more epochs (e.g. --joint-epochs) is unfinished again
        for stage in STAGES[STAGES.index(self.state.stage) :]:
            if self.state.stage != stage:
                self.state.stage, self.state.epoch = stage, 0
            if stage in STRATEGY_STAGES and self.state.epoch == 0:  # each strategy head starts from the base head
                self.model.heads[self.model.strategy(stage).head].load_state_dict(self.model.heads["base"].state_dict())
            if self.state.epoch >= self.epochs_for(stage) and not self._fit_pending(stage):
                continue
            if stage != "backbone":
                self._prepare_frozen_front_end(stage, on_step)
            optimizer = self._optimizer(stage)
            for epoch in range(self.state.epoch, self.epochs_for(stage)):
                stats = self._train_epoch(stage, epoch, optimizer, on_step)
                for fitted in (self.model.strategy("adaptive").chooser.fitted, self.model.strategy("confident_exit").fitted):
                    fitted.zero_()  # the selector, a head or the encoder changed: fit again
                self._end_epoch(stage, epoch, stats, optimizer)
        self._fit_depth_pending(on_step)
        self.state.done = True
        self._save(None)
        return self.state

    def _fit_depth_pending(self, on_step: StepCallback | None) -> None:
        """Stage 4 when ``depth_clips`` asks for it: the depth chooser's fit where the run's chooser is not
        fitted (or was fitted before the last epoch), then confident exit's calibration where it is not
        calibrated. Too few clips: logged, and the run stays usable at fixed depths."""
        if not self.cfg.depth_clips:
            return
        step = partial(on_step, "depth") if on_step else None
        if not self.model.strategy("adaptive").chooser.is_fitted:
            if self._train_cache is None:
                self._train_cache = cache_front_ends(self.model, self.train_data)
            try:
                fitted = fit_depth(self.model, self._train_cache, self._validation_cache(), self.cfg.depth_clips, self.cfg.seed, on_step=step)
            except ValueError as exc:
                self.log(f"depth stage skipped: {exc}")
                return
            stats = self._log_depth_fit("depth", "adaptive", fitted)
            self.log(f"depth chooser fitted on {fitted['clips']} clips ({fitted['epochs']} epochs): {stats}")
        if not self.model.strategy("confident_exit").is_fitted:
            try:
                calibrated = calibrate_exits(self.model, self._validation_cache(), on_step=step)
            except ValueError as exc:
                self.log(f"confident exit not calibrated: {exc}")
                return
            self.log(f"confident exit calibrated: {self._log_depth_fit('confident_exit', 'confident_exit', calibrated)}")

    def _log_depth_fit(self, fit: str, strategy: str, info: dict) -> str:
        """Append a stage-4 fit to the history (with ``strategy``'s validation scores at a mean of half the
        layers), save, and say the score."""
        k = self.model.k_for(0.5)
        stats = {"stage": "depth", "epoch": 0, "fit": fit, **info, **prefixed("val_", validate(self.model, self._validation_cache(), strategy, k))}
        self.state.history.append(stats)
        self._save(None)
        return f"val {self.metric} {stats['val_' + self.metric]:.3f} at a mean of k={k} (on its calibration clips, so within the budget)"

    def _prepare_frozen_front_end(self, stage: str, on_step: StepCallback | None) -> None:
        """Stages after the backbone's: cache the training front ends (and the distillation teacher), and
        fit a table strategy's scorer once."""
        if self._train_cache is None:
            self._train_cache = cache_front_ends(self.model, self.train_data)
            if self.cfg.distill > 0 and (self.cfg.strategy_epochs > 0 or self.cfg.joint_epochs > 0):  # read only by epochs
                add_teacher(self.model, self._train_cache)  # on a resumed joint stage: the current full model
        if self._fit_pending(stage):
            val_cache = self._validation_cache()
            if self._tables is None:
                self._tables = self._set_tables(self._train_cache, val_cache, on_step)
            self._fit_from_tables(stage, self._tables, val_cache)

    def _validation_cache(self) -> FrontEndCache:
        if self._val_cache is None:
            self._val_cache = cache_front_ends(self.model, self.val_data)
        return self._val_cache

    def _train_epoch(self, stage: str, epoch: int, optimizer: torch.optim.Optimizer, on_step: StepCallback | None) -> dict:
        if stage == "backbone":
            return train_backbone_epoch(self.model, self.train_data, optimizer, self.cfg, epoch, on_step)
        if stage == "joint":
            return train_joint_epoch(self.model, self._train_cache, optimizer, self.cfg, epoch, on_step)
        return train_strategy_epoch(
            self.model, stage, self._train_cache, optimizer, self.cfg.strategy_epochs, epoch,
            seed=self.cfg.seed, batch_size=self.cfg.batch_size, on_step=on_step, distill=self.cfg.distill,
            oracle_weight=self.cfg.oracle_weight if stage == "selector" else 0.0, oracle_sets=self.cfg.oracle_sets,
            learn_scores=not self._from_table(stage),
        )

    def _end_epoch(self, stage: str, epoch: int, stats: dict, optimizer: torch.optim.Optimizer) -> None:
        """Validate (the full model after a backbone epoch, the selector at keep 0.5 otherwise), save, log."""
        if stage == "backbone":
            self._val_cache = None  # the front end changed
        val_cache = self._validation_cache()
        strategy = {"backbone": "full", "joint": "selector"}.get(stage, stage)
        k = self.model.num_layers if stage == "backbone" else self.model.k_for(0.5)
        stats.update(stage=stage, epoch=epoch + 1, **prefixed("val_", validate(self.model, val_cache, strategy, k)))
        if stage == "backbone":
            stats.update(prefixed("val_half_random_", validate(self.model, val_cache, "random", self.model.k_for(0.5))))
        if stage == "joint":
            stats.update(prefixed("val_full_", validate(self.model, val_cache, "full", self.model.num_layers)))
        self.state.history.append(stats)
        self.state.epoch = epoch + 1
        self._save(optimizer)
        metric = self.metric
        self.log(
            f"{stage} epoch {epoch + 1}/{self.epochs_for(stage)}: loss {stats['loss']:.3f} "
            f"train {metric} {stats['train_' + metric]:.3f} val {metric} {stats['val_' + metric]:.3f}"
        )
