"""Centralised training of a dynamic model, in resumable stages.

1. ``backbone``: backbone + base head learn the task while random layers are dropped per example
   (LayerDrop, each layer dropped with probability ``layerdrop``), so the encoder tolerates missing
   layers. Masks are applied with the gathering runner, so dropped layers cost nothing.
2. ``early_exit``, ``static``, ``selector``: the backbone is frozen — every strategy is then compared
   on the same encoder, and the selector stays the small part a device can fine-tune and send. The
   always-run front end is computed once and cached, so these stages run only encoder layers.
   Each starts its head from the base head. ``static`` and ``selector`` learn layer scores through
   straight-through Gumbel top-k gates; k is drawn per batch so one scorer serves every budget.
   With ``set_table`` their scorers are instead fitted on every layer set's loss over some training
   clips (:mod:`.set_fit`), then their heads alone learn on the fitted sets.
3. ``joint`` (``joint_epochs``, off by default for kws): the encoder layers are fine-tuned together
   with every strategy's head, each on the layer sets it runs (:mod:`.joint_train`); the front end and
   the scorers stay frozen, and every strategy is still compared on one encoder.

The loops are task-agnostic: a batch is ``(waveforms, sample mask, texts)`` and the model's task
head turns texts into targets and hidden states into a loss (cross-entropy over labels for kws,
CTC over characters for asr). Stage 2 may add a KL term towards the full model's outputs
(``distill``), the distillation of the authors' follow-up work; so may stage 3.

After every epoch (and every set-table fit) the run folder holds the model, the optimiser (named by
its stage) and the progress, so an interrupted ``ldfleet train`` resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from functools import partial
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .data.loading import pad_batch
from .metrics import score
from .model.backbone import load_backbone
from .model.checkpoint import load_model, save_model
from .model.dynamic import DynamicModel
from .model.heads import build_head, choose_vocab, vocab_from_spec
from .model.runner import FrontEnd
from .model.strategies import ScoredChoice
from .set_fit import TABLE_STRATEGIES, fit_from_tables, set_loss_table

STAGES = ("backbone", "early_exit", "static", "selector", "joint")
STRATEGY_STAGES = STAGES[1:4]  # stage 2: one strategy each, on the frozen backbone
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
OPTIM_FILE = "optimizer.pt"

StepCallback = Callable[[str, int, int], None]  # (stage, step, total_steps)


@dataclass
class TrainConfig:
    task: str = "kws"  # kws | asr
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
    labels: list[str] | None = None  # kws label set (None: the 12 keyword labels)
    vocab: list[str] | None = None  # asr tokens (None: from the training transcripts)
    tokens: str = "char"  # asr token unit: char | word (heads.WordVocab: closed vocabularies only)
    distill: float = 0.0  # stage-2 weight of KL(full model || strategy) on the head outputs
    selector_budget: bool = False  # the selector also sees the budget k / L
    oracle_weight: float = 0.0  # selector stage: weight of supervision by the per-batch oracle's layer sets
    oracle_sets: int = 4  # candidate layer sets per batch for that supervision
    from_run: str | None = None  # skip stage 1: start stage 2 from this run's trained backbone and base head
    # > 0: fit static and selector on every layer set's loss over this many training clips
    # (and a quarter as many validation clips) instead of by straight-through gates (common/set_fit.py);
    # their strategy_epochs then train only their heads, on the fitted sets (0: keep the base head)
    set_table: int = 0
    # stage 3 (common/joint_train.py): epochs fine-tuning the shared encoder with every strategy on its own sets
    joint_epochs: int = 0

    def __post_init__(self) -> None:
        if self.set_table and self.oracle_weight:
            raise ValueError("--oracle-weight supervises scores learned through gates; with --set-table (N > 0) the "
                             "scores are fitted on the table instead: give --set-table 0 with it")

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


# On the default corpus (README, speech recognition): LayerDrop 0.1 (HF's, TrainConfig's default) gave a
# better full model than 0.2 (5.3% against 6.0% WER) and better sets at keep 0.75, 0.2 better ones at 0.5
# and 0.25 (with base heads; not measured with the rest of this recipe);
# a budget-conditioned selector beat the nested one (15% below random at keep 0.5 and 0.25, against
# 3-4%); fitting it and static on a set table, then tuning their heads with distillation from the full
# model, beat straight-through gates at 0.5 and 0.25 and tuning without distillation at every keep; 6
# joint epochs then lowered every method's WER at every keep (the selector's most: 7.4 / 14.1 / 42.9% ->
# 6.1 / 9.1 / 21.5% at keep 0.75 / 0.5 / 0.25, random 7.8 / 18.6 / 66.4% -> 6.4 / 13.8 / 54.0%); 3 epochs
# gave 6.2 / 10.1 / 26.9%.
ASR_DEFAULTS = dict(epochs=24, strategy_epochs=4, batch_size=16, lr=2e-3, selector_budget=True, set_table=512, distill=1.0,
                    joint_epochs=6)


def config_for(task: str, **overrides) -> TrainConfig:
    """The default recipe for ``task`` (asr: more epochs, smaller batches, a higher lr), then overrides.

    ``None`` overrides are ignored, so CLI options left unset keep the task's default; with ``from_run``
    the default is no stage 3 (``joint_epochs=0``).
    """
    base = dict(ASR_DEFAULTS) if task == "asr" else {}
    if overrides.get("from_run"):  # stage 2 on the source's encoder, as it is, unless stage 3 is asked for
        base["joint_epochs"] = 0
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(task=task, **base)


def saved_joint_epochs(run: str | Path) -> int | None:
    """The ``joint_epochs`` a run folder was started with (0 for runs older than stage 3), or None when
    ``run`` holds no run yet. Re-running a finished run keeps its own stage 3 unless told otherwise."""
    path = Path(run) / CONFIG_FILE
    return int(json.loads(path.read_text()).get("joint_epochs", 0)) if (Path(run) / STATE_FILE).is_file() and path.is_file() else None


def augment(wave: Tensor, gen: torch.Generator, mask: Tensor | None = None) -> Tensor:
    """Shift up to 100 ms (fixed-length clips only), random gain, noise at 10-40 dB SNR on half the clips."""
    b, n = wave.shape
    if mask is None:
        shifts = torch.randint(-1600, 1601, (b,), generator=gen)
        wave = torch.stack([torch.roll(w, int(s)) for w, s in zip(wave, shifts)])
    wave = wave * (10 ** (torch.empty(b, 1).uniform_(-0.3, 0.3, generator=gen)))
    snr_db = torch.empty(b, 1).uniform_(10, 40, generator=gen)
    power = wave.pow(2).mean(1, keepdim=True).clamp(min=1e-8)
    noise = torch.randn(b, n, generator=gen) * torch.sqrt(power / 10 ** (snr_db / 10))
    use = (torch.rand(b, 1, generator=gen) < 0.5).to(wave.dtype)
    out = wave + use * noise
    return out if mask is None else out * mask.to(out.dtype)


def random_keep(batch: int, num_layers: int, layerdrop: float, gen: torch.Generator) -> Tensor:
    """LayerDrop per example: each layer is dropped with probability ``layerdrop``; one always stays."""
    keep = torch.rand(batch, num_layers, generator=gen) >= layerdrop
    empty = ~keep.any(1)
    if empty.any():
        keep[empty, torch.randint(num_layers, (int(empty.sum()),), generator=gen)] = True
    return keep


def length_batches(lengths: Tensor, batch_size: int, gen: torch.Generator, pool: int = 8) -> list[Tensor]:
    """Shuffled batches of similar-length inputs, so little compute goes into padding.

    The data are shuffled, cut into pools of ``pool`` batches, each pool sorted by length and cut
    into batches, and the batches shuffled again: random contents, near-uniform length per batch.
    """
    order = torch.randperm(len(lengths), generator=gen)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """Batches of ``pad_batch``; inputs of varying length (``dataset.lengths``) are batched by length."""
    gen = torch.Generator().manual_seed(seed)
    lengths = getattr(dataset, "lengths", None)
    if shuffle and lengths is not None:
        batches = length_batches(torch.as_tensor(lengths), batch_size, gen)
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], collate_fn=pad_batch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False, collate_fn=pad_batch)


def texts_of(data: Dataset) -> list[str]:
    """Every text (label name or transcript) of a dataset of ``(waveform, text)`` items."""
    texts = getattr(data, "texts", None)
    return list(texts) if texts is not None else pad_batch([data[i] for i in range(len(data))])[2]


def new_head(cfg: TrainConfig, hidden_size: int, train: Dataset):
    """The task head a new run starts with; the CTC vocabulary (``cfg.tokens``: characters, or whole
    words) comes from the training transcripts."""
    if cfg.task == "asr":
        vocab = vocab_from_spec(cfg.tokens, cfg.vocab) if cfg.vocab else choose_vocab(texts_of(train), cfg.tokens)
        cfg.vocab = vocab.tokens[2:]
        return build_head("asr", hidden_size, vocab=vocab)
    return build_head("kws", hidden_size, labels=cfg.labels)


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
    loss_sum = seen = 0
    predictions, references = [], []
    for step, (wave, mask, texts) in enumerate(loader):
        _set_lr(optimizer, epoch * len(loader) + step, total_steps)
        front = model.front_end(augment(wave, gen, mask), mask)
        keep = random_keep(wave.shape[0], model.num_layers, cfg.layerdrop, gen)
        logits = head.logits(model.runner.run_layers(front, keep), front.frame_mask)
        loss = head.loss_from_logits(logits, front.frame_mask, head.targets(texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        loss_sum += loss.item() * len(texts)
        seen += len(texts)
        predictions += head.decode(logits.detach(), front.frame_mask)
        references += texts
        if on_step:
            on_step("backbone", step + 1, len(loader))
    return {"loss": loss_sum / seen, **_prefixed("train_", score(model.task, predictions, references))}


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {prefix + k: v for k, v in scores.items()}


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
    """Front-end outputs of a whole (un-augmented) dataset: the frozen part, computed once.

    ``hidden``/``features`` are ``[N, T, D]``, padded to the longest input; ``frame_mask``
    ``[N, T]`` marks real frames (None when nothing is padded); ``texts`` are the N targets.
    ``teacher`` (optional) holds the full model's head outputs, for distillation.
    """

    hidden: Tensor
    features: Tensor
    texts: list[str]
    frame_mask: Tensor | None = None
    teacher: Tensor | None = None

    def batch(self, rows: Tensor) -> tuple[FrontEnd, list[str]]:
        """The rows' front end, cut to the longest real input among them."""
        mask = None if self.frame_mask is None else self.frame_mask[rows]
        t = self.hidden.shape[1] if mask is None else max(1, int(mask.sum(1).max()))
        if mask is not None:
            mask = None if bool(mask[:, :t].all()) else mask[:, :t]
        front = FrontEnd(self.hidden[rows, :t], self.features[rows, :t], mask)
        return front, [self.texts[i] for i in rows.tolist()]

    def lengths(self) -> Tensor:
        """Real frames of every cached input ``[N]``."""
        if self.frame_mask is None:
            return torch.full((len(self),), self.hidden.shape[1], dtype=torch.long)
        return self.frame_mask.sum(1)

    def teacher_logits(self, rows: Tensor, frames: int) -> Tensor | None:
        if self.teacher is None:
            return None
        return self.teacher[rows, :frames] if self.teacher.dim() == 3 else self.teacher[rows]

    def __len__(self) -> int:
        return len(self.texts)


def _pad_cat(parts: list[Tensor], value=0) -> Tensor:
    """Concatenate ``[n_i, T_i, ...]`` tensors along dim 0, padding dim 1 to the longest."""
    t = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, t - p.shape[1]), value=value) for p in parts])


@torch.inference_mode()
def cache_front_ends(model: DynamicModel, data: Dataset, batch_size: int = 64) -> FrontEndCache:
    model.eval()
    hidden, features, masks, texts = [], [], [], []
    for wave, mask, batch_texts in DataLoader(data, batch_size=batch_size, collate_fn=pad_batch):
        front = model.front_end(wave, mask)
        hidden.append(front.hidden)
        features.append(front.features)
        fm = front.frame_mask
        masks.append(torch.ones(front.hidden.shape[:2], dtype=torch.bool) if fm is None else fm)
        texts += batch_texts
    frame_mask = _pad_cat(masks, value=False)
    return FrontEndCache(_pad_cat(hidden), _pad_cat(features), texts, None if bool(frame_mask.all()) else frame_mask)


@torch.inference_mode()
def add_teacher(model: DynamicModel, cache: FrontEndCache, batch_size: int = 64) -> None:
    """Store the full model's base-head outputs for every cached input (the distillation target)."""
    model.eval()
    parts = []
    for start in range(0, len(cache), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(cache)))
        front, _ = cache.batch(rows)
        parts.append(model.heads["base"].logits(model.runner.run_layers(front, None), front.frame_mask))
    cache.teacher = _pad_cat(parts) if parts[0].dim() == 3 else torch.cat(parts)


@torch.no_grad()
def oracle_keep(model: DynamicModel, front: FrontEnd, targets, k: int, n: int, gen: torch.Generator) -> Tensor:
    """Per input, the best of ``n`` random k-layer sets by the base head's loss: bool ``[B, L]``.

    The supervision target for ``oracle_weight``: the selector learns to score the layers of the
    set that worked best for each input above the others.
    """
    head = model.heads["base"]
    cands = [torch.randperm(model.num_layers, generator=gen)[:k] for _ in range(n)]
    losses = []
    for idx in cands:
        keep = torch.zeros(front.hidden.shape[0], model.num_layers, dtype=torch.bool)
        keep[:, idx] = True
        logits = head.logits(model.runner.run_layers(front, keep), front.frame_mask)
        losses.append(head.example_losses(logits, front.frame_mask, targets))
    best = torch.stack(losses).argmin(0)
    out = torch.zeros(front.hidden.shape[0], model.num_layers, dtype=torch.bool)
    for row, c in enumerate(best.tolist()):
        out[row, cands[c]] = True
    return out


def strategy_optimizer(model: DynamicModel, name: str, cfg: TrainConfig, learn_scores: bool = True) -> torch.optim.Optimizer:
    """AdamW over the strategy's head and, when ``learn_scores``, its scorer."""
    choice = model.strategy(name)
    groups = [{"params": model.heads[choice.head].parameters(), "lr": cfg.head_lr}]
    if isinstance(choice, ScoredChoice) and learn_scores:
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
    distill: float = 0.0,
    oracle_weight: float = 0.0,
    oracle_sets: int = 4,
    learn_scores: bool = True,
) -> dict:
    """One epoch of a stage-2 strategy: its head (and scorer) learn under sampled budgets.

    ``learn_scores=False``: a learned strategy's scorer stays as it is (e.g. fitted on a set table) and
    its head learns on the hard sets it chooses.

    ``budgets`` restricts the layer counts drawn per batch (a device trains under its own budget);
    by default k is uniform in 1..L. With ``distill > 0`` (and ``cache.teacher`` set) the loss adds
    ``distill * KL(full model || strategy)`` of the head outputs; with ``oracle_weight > 0`` a strategy
    whose scores learn (``learn_scores``) is also pushed (binary cross-entropy) towards the per-input best of
    ``oracle_sets`` random k-layer sets (:func:`oracle_keep`).
    """
    choice = model.strategy(name)
    head = model.heads[choice.head]
    model.runner.eval()  # frozen backbone: no dropout, no gradients into its weights
    model.runner.requires_grad_(False)
    head.train()
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    batches = length_batches(cache.lengths(), batch_size, gen)
    steps = len(batches)
    total = epochs * steps
    ks = budgets or tuple(range(1, model.num_layers + 1))
    loss_sum = seen = 0
    predictions, references = [], []
    layers_used = torch.zeros(model.num_layers)
    for step in range(steps):
        rows = batches[step]
        front, texts = cache.batch(rows)
        k = ks[int(torch.randint(len(ks), (1,), generator=gen))]
        _set_lr(optimizer, epoch * steps + step, total, warmup=20)
        learning = isinstance(choice, ScoredChoice) and learn_scores
        if learning:
            # Exploration noise fades linearly so the last steps train the sets used at run time.
            noise_scale = 1.0 - (epoch * steps + step) / max(1, total)
            gates = choice.gates(front, k, tau=1.0, noise_scale=noise_scale)
            hidden = model.runner.run_layers_gated(front, gates)
            keep = gates.detach() > 0.5
        else:
            with torch.no_grad():
                keep = choice.choose(front, k, gen)
                hidden = model.runner.run_layers(front, keep)
        logits = head.logits(hidden, front.frame_mask)
        targets = head.targets(texts)
        loss = head.loss_from_logits(logits, front.frame_mask, targets)
        if oracle_weight > 0 and learning and k < model.num_layers:
            best = oracle_keep(model, front, targets, k, oracle_sets, gen).float()
            loss = loss + oracle_weight * F.binary_cross_entropy_with_logits(choice.scores(front, k), best)
        teacher = cache.teacher_logits(rows, logits.shape[1]) if distill > 0 else None
        if teacher is not None:
            loss = loss + distill * head.distill_loss(logits, teacher, front.frame_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(texts)
        seen += len(texts)
        predictions += head.decode(logits.detach(), front.frame_mask)
        references += texts
        layers_used += keep.float().sum(0)
        if on_step:
            on_step(name, step + 1, steps)
    return {
        "loss": loss_sum / seen,
        **_prefixed("train_", score(model.task, predictions, references)),
        "layer_usage": (layers_used / seen).tolist(),
    }


# ---- evaluation used for validation during training -----------------------------------------


@torch.inference_mode()
def validate(model: DynamicModel, cache: FrontEndCache, strategy: str, k: int, batch_size: int = 128) -> dict[str, float]:
    """The task's scores (accuracy, or WER and CER) of one strategy at k layers on cached inputs."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    predictions = []
    for start in range(0, len(cache), batch_size):
        front, _ = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
        predictions += model.predict(front, strategy, k, gen)[0]
    return score(model.task, predictions, cache.texts)


# ---- the resumable driver -------------------------------------------------------------------


def read_progress(run: Path) -> tuple[dict, TrainState]:
    """A run folder's saved config (as written: a dict) and progress."""
    return json.loads((run / CONFIG_FILE).read_text()), TrainState(**json.loads((run / STATE_FILE).read_text()))


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
    if not (source / STATE_FILE).is_file() or not (source / CONFIG_FILE).is_file():
        raise ValueError(f"{source} is not a run made by `ldfleet train` (no {STATE_FILE} or {CONFIG_FILE})")
    model = load_model(source)
    if type(model) is not DynamicModel:
        raise ValueError(f"{source} is a {type(model).__name__} run; --from-run takes the SSL encoders' runs")
    src_cfg, src_state = read_progress(source)
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
        if (self.run / STATE_FILE).exists():
            saved_cfg, self.state = read_progress(self.run)
            known = {k: v for k, v in saved_cfg.items() if k in TrainConfig.__dataclass_fields__}
            self.cfg = TrainConfig(**{**known, "epochs": cfg.epochs, "strategy_epochs": cfg.strategy_epochs,
                                       "joint_epochs": cfg.joint_epochs})
            self.model = load_model(self.run)
            self.log(f"resuming {self.run}: stage {self.state.stage}, {self.state.epoch} epoch(s) done")
        else:
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
            from .joint_train import joint_optimizer  # imports this module

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
        gen = torch.Generator().manual_seed(self.cfg.seed)
        n = self.cfg.set_table
        rows = {"train": torch.randperm(len(train_cache), generator=gen)[:n],
                "val": torch.randperm(len(val_cache), generator=gen)[: max(1, n // 4)]}

        def progress(split: str):
            return partial(on_step, f"set table ({split})") if on_step else None

        return (set_loss_table(self.model, train_cache, rows["train"], on_item=progress("train")),
                set_loss_table(self.model, val_cache, rows["val"], on_item=progress("val")))

    def _fit_from_tables(self, stage: str, tables, val_cache: FrontEndCache) -> None:
        fitted = fit_from_tables(self.model, stage, *tables, seed=self.cfg.seed, log=lambda _msg: None)
        k = self.model.k_for(0.5)
        stats = {"stage": stage, "epoch": 0, "fit": "set_table", "best_epoch": fitted["best_epoch"],
                 "val_chosen_loss": fitted["val_chosen_loss"], "train_chosen_loss": fitted["train_chosen_loss"],
                 **_prefixed("val_", validate(self.model, val_cache, stage, k))}
        self.state.history.append(stats)
        self._save(None)
        metric = self.metric
        self.log(f"{stage} fitted on the set table: val {metric} {stats['val_' + metric]:.3f} at k={k}; "
                 f"val loss of chosen sets per k {', '.join(f'{size}: {v:.3f}' for size, v in fitted['val_chosen_loss'].items())}")

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
                self._end_epoch(stage, epoch, stats, optimizer)
        self.state.done = True
        self._save(None)
        return self.state

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
            from .joint_train import train_joint_epoch  # imports this module

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
        stats.update(stage=stage, epoch=epoch + 1, **_prefixed("val_", validate(self.model, val_cache, strategy, k)))
        if stage == "backbone":
            stats.update(_prefixed("val_half_random_", validate(self.model, val_cache, "random", self.model.k_for(0.5))))
        if stage == "joint":
            stats.update(_prefixed("val_full_", validate(self.model, val_cache, "full", self.model.num_layers)))
        self.state.history.append(stats)
        self.state.epoch = epoch + 1
        self._save(optimizer)
        metric = self.metric
        self.log(
            f"{stage} epoch {epoch + 1}/{self.epochs_for(stage)}: loss {stats['loss']:.3f} "
            f"train {metric} {stats['train_' + metric]:.3f} val {metric} {stats['val_' + metric]:.3f}"
        )
