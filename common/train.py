"""Centralised training of a dynamic model, in resumable stages.

1. ``backbone``: backbone + base head learn the task while random layers are dropped per example
   (LayerDrop, each layer dropped with probability ``layerdrop``), so the encoder tolerates missing
   layers. Masks are applied with the gathering runner, so dropped layers cost nothing.
2. ``early_exit``, ``static``, ``selector``: the backbone is frozen — every strategy is then compared
   on the same encoder, and the selector stays the small part a device can fine-tune and send. The
   always-run front end is computed once and cached, so these stages run only encoder layers.
   Each starts its head from the base head. ``static`` and ``selector`` learn layer scores through
   straight-through Gumbel top-k gates; k is drawn per batch so one scorer serves every budget.

After every epoch the run folder holds the model, the optimiser and the progress, so an
interrupted ``ldfleet train`` resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .model.backbone import load_backbone
from .model.checkpoint import load_model, save_model
from .model.dynamic import DynamicModel
from .model.runner import FrontEnd
from .model.selector import topk_mask
from .model.strategies import ScoredChoice

STAGES = ("backbone", "early_exit", "static", "selector")
STATE_FILE = "train_state.json"
OPTIM_FILE = "optimizer.pt"

StepCallback = Callable[[str, int, int], None]  # (stage, step, total_steps)


@dataclass
class TrainConfig:
    backbone: str = "tiny"  # size name, hub id or local folder
    family: str = "wavlm"  # used for size names only
    epochs: int = 20  # stage 1
    strategy_epochs: int = 6  # each of the stage-2 strategies
    batch_size: int = 32
    lr: float = 1e-3  # backbone lr for a model trained from scratch
    pretrained_lr: float = 5e-5  # backbone lr when starting from a checkpoint
    head_lr: float = 2e-3
    selector_lr: float = 3e-3
    # Stage-1 LayerDrop rate per layer and example. 0.1 is HF's default for these encoders, i.e. how
    # real checkpoints are fine-tuned; ~0.5 makes any random layer subset work almost as well.
    layerdrop: float = 0.1
    selector_hidden: int = 64
    seed: int = 0
    num_classes: int = 12

    @property
    def from_checkpoint(self) -> bool:
        return self.backbone not in ("tiny", "base")


@dataclass
class TrainState:
    stage: str = STAGES[0]
    epoch: int = 0  # epochs finished in `stage`
    done: bool = False
    history: list[dict] = field(default_factory=list)


# ---- batches --------------------------------------------------------------------------------


def augment(wave: Tensor, gen: torch.Generator) -> Tensor:
    """Shift up to 100 ms, random gain, and noise at 10-40 dB SNR on half the clips."""
    b, n = wave.shape
    shifts = torch.randint(-1600, 1601, (b,), generator=gen)
    wave = torch.stack([torch.roll(w, int(s)) for w, s in zip(wave, shifts)])
    wave = wave * (10 ** (torch.empty(b, 1).uniform_(-0.3, 0.3, generator=gen)))
    snr_db = torch.empty(b, 1).uniform_(10, 40, generator=gen)
    power = wave.pow(2).mean(1, keepdim=True).clamp(min=1e-8)
    noise = torch.randn(b, n, generator=gen) * torch.sqrt(power / 10 ** (snr_db / 10))
    use = (torch.rand(b, 1, generator=gen) < 0.5).to(wave.dtype)
    return wave + use * noise


def random_keep(batch: int, num_layers: int, layerdrop: float, gen: torch.Generator) -> Tensor:
    """LayerDrop per example: each layer is dropped with probability ``layerdrop``; one always stays."""
    keep = torch.rand(batch, num_layers, generator=gen) >= layerdrop
    empty = ~keep.any(1)
    if empty.any():
        keep[empty, torch.randint(num_layers, (int(empty.sum()),), generator=gen)] = True
    return keep


def _loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)


# ---- stage 1: backbone under random layer dropping -----------------------------------------


def backbone_optimizer(model: DynamicModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    lr = cfg.pretrained_lr if cfg.from_checkpoint else cfg.lr
    return torch.optim.AdamW(
        [
            {"params": model.runner.parameters(), "lr": lr},
            {"params": model.heads["base"].parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=0.01,
    )


def train_backbone_epoch(
    model: DynamicModel,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    on_step: StepCallback | None = None,
) -> dict:
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    loader = _loader(data, cfg.batch_size, cfg.seed * 1000 + epoch)
    head = model.heads["base"]
    total_steps = cfg.epochs * len(loader)
    loss_sum = correct = seen = 0
    for step, (wave, label) in enumerate(loader):
        _set_lr(optimizer, epoch * len(loader) + step, total_steps)
        front = model.front_end(augment(wave, gen))
        keep = random_keep(wave.shape[0], model.num_layers, cfg.layerdrop, gen)
        logits = head(model.runner.run_layers(front, keep), front.frame_mask)
        loss = head.loss(logits, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        loss_sum += loss.item() * len(label)
        correct += int((head.predict(logits) == label).sum())
        seen += len(label)
        if on_step:
            on_step("backbone", step + 1, len(loader))
    return {"loss": loss_sum / seen, "train_accuracy": correct / seen}


def _set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int = 100) -> None:
    """Linear warm-up then cosine decay, applied to each group's base lr."""
    warmup = min(warmup, total // 10 + 1)  # short runs still spend most steps at full lr
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        if step < warmup:
            group["lr"] = base * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            group["lr"] = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- stage 2: strategies on a frozen backbone ----------------------------------------------


@dataclass
class FrontEndCache:
    """Front-end outputs of a whole (un-augmented) dataset: the frozen part, computed once."""

    hidden: Tensor
    features: Tensor
    labels: Tensor

    def batch(self, rows: Tensor) -> tuple[FrontEnd, Tensor]:
        return FrontEnd(self.hidden[rows], self.features[rows], None), self.labels[rows]

    def __len__(self) -> int:
        return len(self.labels)


@torch.inference_mode()
def cache_front_ends(model: DynamicModel, data: Dataset, batch_size: int = 64) -> FrontEndCache:
    model.eval()
    hidden, features, labels = [], [], []
    for wave, label in DataLoader(data, batch_size=batch_size):
        front = model.front_end(wave)
        hidden.append(front.hidden)
        features.append(front.features)
        labels.append(label)
    return FrontEndCache(torch.cat(hidden), torch.cat(features), torch.cat(labels))


def strategy_optimizer(model: DynamicModel, name: str, cfg: TrainConfig) -> torch.optim.Optimizer:
    choice = model.strategy(name)
    groups = [{"params": model.heads[choice.head].parameters(), "lr": cfg.head_lr}]
    if isinstance(choice, ScoredChoice):
        groups.append({"params": choice.parameters(), "lr": cfg.selector_lr})
    return torch.optim.AdamW(groups, weight_decay=0.01)


def train_strategy_epoch(
    model: DynamicModel,
    name: str,
    cache: FrontEndCache,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    epoch: int,
    seed: int = 0,
    batch_size: int = 32,
    budgets: tuple[int, ...] | None = None,
    on_step: StepCallback | None = None,
) -> dict:
    """One epoch of a stage-2 strategy: its head (and scorer) learn under sampled budgets.

    ``budgets`` restricts the layer counts drawn per batch (a device trains under its own budget);
    by default k is uniform in 1..L.
    """
    choice = model.strategy(name)
    head = model.heads[choice.head]
    model.runner.eval()  # frozen backbone: no dropout, no gradients into its weights
    model.runner.requires_grad_(False)
    head.train()
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(len(cache), generator=gen)
    steps = math.ceil(len(cache) / batch_size)
    total = epochs * steps
    ks = budgets or tuple(range(1, model.num_layers + 1))
    loss_sum = correct = seen = 0
    layers_used = torch.zeros(model.num_layers)
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        front, label = cache.batch(rows)
        k = ks[int(torch.randint(len(ks), (1,), generator=gen))]
        _set_lr(optimizer, epoch * steps + step, total, warmup=20)
        if isinstance(choice, ScoredChoice):
            # Exploration noise fades linearly so the last steps train the sets used at run time.
            noise_scale = 1.0 - (epoch * steps + step) / max(1, total)
            gates = choice.gates(front, k, tau=1.0, noise_scale=noise_scale)
            hidden = model.runner.run_layers_gated(front, gates)
            keep = gates.detach() > 0.5
        else:
            with torch.no_grad():
                keep = choice.choose(front, k, gen)
                hidden = model.runner.run_layers(front, keep)
        logits = head(hidden, front.frame_mask)
        loss = head.loss(logits, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(label)
        correct += int((head.predict(logits) == label).sum())
        seen += len(label)
        layers_used += keep.float().sum(0)
        if on_step:
            on_step(name, step + 1, steps)
    return {
        "loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "layer_usage": (layers_used / seen).tolist(),
    }


# ---- evaluation used for validation during training -----------------------------------------


@torch.inference_mode()
def accuracy(model: DynamicModel, cache: FrontEndCache, strategy: str, k: int, batch_size: int = 128) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(0)
    correct = 0
    for start in range(0, len(cache), batch_size):
        front, label = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
        out = model.classify(front, strategy, k, gen)
        correct += int((out.logits.argmax(-1) == label).sum())
    return correct / max(1, len(cache))


# ---- the resumable driver -------------------------------------------------------------------


class Trainer:
    """Runs the stages into ``run_dir``, picking up from ``train_state.json`` when present."""

    def __init__(self, run_dir: str | Path, train: Dataset, val: Dataset, cfg: TrainConfig, log=print):
        self.run = Path(run_dir)
        self.train_data, self.val_data, self.cfg, self.log = train, val, cfg, log
        self.run.mkdir(parents=True, exist_ok=True)
        state_path = self.run / STATE_FILE
        if state_path.exists():
            self.state = TrainState(**json.loads(state_path.read_text()))
            saved_cfg = json.loads((self.run / "train_config.json").read_text())
            self.cfg = TrainConfig(**{**saved_cfg, "epochs": cfg.epochs, "strategy_epochs": cfg.strategy_epochs})
            self.model = load_model(self.run)
            self.log(f"resuming {self.run}: stage {self.state.stage}, {self.state.epoch} epoch(s) done")
        else:
            torch.manual_seed(cfg.seed)
            backbone = load_backbone(cfg.backbone, cfg.family)
            self.model = DynamicModel(backbone, cfg.num_classes, cfg.selector_hidden)
            self.state = TrainState()
            (self.run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def epochs_for(self, stage: str) -> int:
        return self.cfg.epochs if stage == "backbone" else self.cfg.strategy_epochs

    def _save(self, optimizer: torch.optim.Optimizer | None) -> None:
        save_model(self.model, self.run, {"train_config": asdict(self.cfg)})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), self.run / OPTIM_FILE)
        tmp = self.run / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(self.run / STATE_FILE)

    def _optimizer(self, stage: str) -> torch.optim.Optimizer:
        opt = backbone_optimizer(self.model, self.cfg) if stage == "backbone" else strategy_optimizer(self.model, stage, self.cfg)
        if self.state.epoch > 0 and (self.run / OPTIM_FILE).exists():
            opt.load_state_dict(torch.load(self.run / OPTIM_FILE))
        return opt

    def fit(self, on_step: StepCallback | None = None) -> TrainState:
        val_cache = train_cache = None
        for stage in STAGES[STAGES.index(self.state.stage) :]:
            if self.state.stage != stage:
                self.state.stage, self.state.epoch = stage, 0
            if stage != "backbone":
                if self.state.epoch == 0:  # each stage-2 head starts from the trained base head
                    self.model.heads[self.model.strategy(stage).head].load_state_dict(self.model.heads["base"].state_dict())
                if self.epochs_for(stage) == 0:
                    continue
                if train_cache is None:
                    train_cache = cache_front_ends(self.model, self.train_data)
            optimizer = self._optimizer(stage)
            for epoch in range(self.state.epoch, self.epochs_for(stage)):
                if stage == "backbone":
                    stats = train_backbone_epoch(self.model, self.train_data, optimizer, self.cfg, epoch, on_step)
                else:
                    stats = train_strategy_epoch(
                        self.model, stage, train_cache, optimizer, self.cfg.strategy_epochs, epoch,
                        seed=self.cfg.seed, batch_size=self.cfg.batch_size, on_step=on_step,
                    )
                val_cache = cache_front_ends(self.model, self.val_data) if stage == "backbone" or val_cache is None else val_cache
                strategy = "full" if stage == "backbone" else stage
                k = self.model.num_layers if stage == "backbone" else self.model.k_for(0.5)
                stats.update(stage=stage, epoch=epoch + 1, val_accuracy=accuracy(self.model, val_cache, strategy, k))
                if stage == "backbone":
                    stats["val_accuracy_half_random"] = accuracy(self.model, val_cache, "random", self.model.k_for(0.5))
                self.state.history.append(stats)
                self.state.epoch = epoch + 1
                self._save(optimizer)
                self.log(
                    f"{stage} epoch {epoch + 1}/{self.epochs_for(stage)}: loss {stats['loss']:.3f} "
                    f"train {stats['train_accuracy']:.3f} val {stats['val_accuracy']:.3f}"
                )
        self.state.done = True
        self._save(None)
        return self.state
