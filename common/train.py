"""The epochs of centralised training, task-agnostic; :mod:`.trainer` runs them as resumable stages.

1. ``backbone`` (:func:`train_backbone_epoch`): backbone + base head learn the task while random
   layers are dropped per example (LayerDrop, each layer dropped with probability ``layerdrop``), so
   the encoder tolerates missing layers. Masks are applied with the gathering runner, so dropped
   layers cost nothing.
2. ``early_exit``, ``static``, ``selector`` (:func:`train_strategy_epoch`): the backbone is frozen —
   every strategy is then compared on the same encoder, and the selector stays the small part a
   device can fine-tune and send. The always-run front end is computed once and cached
   (:class:`~.front_cache.FrontEndCache`), so these stages run only encoder layers. Each starts its head from the
   base head. ``static`` and ``selector`` learn layer scores through straight-through Gumbel top-k
   gates; k is drawn per batch so one scorer serves every budget. With ``set_table`` their scorers
   are instead fitted on every layer set's loss over some training clips (:mod:`.set_fit`), then
   their heads alone learn on the fitted sets.
3. ``joint`` (:mod:`.joint_train`): the encoder layers are fine-tuned with every strategy's head on
   the layer sets it runs.

A batch is ``(waveforms, sample mask, texts)`` and the model's task head turns texts into targets
and hidden states into a loss (cross-entropy over labels for kws, CTC over characters for asr).
Stages 2 and 3 may add a KL term towards the full model's outputs (``distill``), the distillation
of the authors' follow-up work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .batching import TRAINING, MemoryBudget, budgeted_batches, budgeted_loader
from .data.loading import pad_batch
from .front_cache import FrontEndCache
from .metrics import score
from .model.dynamic import DynamicModel
from .model.heads import build_head, choose_vocab, vocab_from_spec
from .model.runner import FrontEnd
from .model.strategies import ScoredChoice

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
    # stage 3 (common/joint_train.py): epochs fine-tuning the shared encoder with every strategy on its own sets;
    # None: the task's default (DEFAULT_JOINT_EPOCHS; 0 with from_run) for a new run, the run's own on resume
    joint_epochs: int | None = None
    # stage 4 (common/depth_fit.py): training clips the adaptive strategy's depth chooser is fitted on (0: none);
    # None: the task's default (DEFAULT_DEPTH_CLIPS) for a new run, the run's own on resume
    depth_clips: int | None = None
    # asr: training clips longer than this many seconds were left out (0: none); a resumed run must keep
    # it, or it would go on training on another set of clips
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.set_table and self.oracle_weight:
            raise ValueError("--oracle-weight supervises scores learned through gates; with --set-table (N > 0) the "
                             "scores are fitted on the table instead: give --set-table 0 with it")

    @property
    def from_checkpoint(self) -> bool:
        return self.backbone not in ("tiny", "base")


# ---- batches --------------------------------------------------------------------------------


# On the default corpus (README, speech recognition): LayerDrop 0.1 (HF's, TrainConfig's default) gave a
# better full model than 0.2 (5.3% against 6.0% WER) and better sets at keep 0.75, 0.2 better ones at 0.5
# and 0.25 (with base heads; not measured with the rest of this recipe);
# a budget-conditioned selector beat the nested one (15% below random at keep 0.5 and 0.25, against
# 3-4%); fitting it and static on a set table, then tuning their heads with distillation from the full
# model, beat straight-through gates at 0.5 and 0.25 and tuning without distillation at every keep; 6
# joint epochs then lowered every method's WER at every keep (selector 7.4 / 14.1 / 42.9% -> 6.2 / 9.2 /
# 21.4% at keep 0.75 / 0.5 / 0.25, random 7.8 / 18.6 / 66.4% -> 6.4 / 12.2 / 38.8%); 3 epochs gave the
# selector 6.2 / 10.1 / 26.9%.
ASR_DEFAULTS = dict(epochs=24, strategy_epochs=4, batch_size=16, lr=2e-3, selector_budget=True, set_table=512, distill=1.0)
DEFAULT_JOINT_EPOCHS = {"kws": 0, "asr": 6}  # a new run's stage 3 (common.trainer.joint_epochs_for)
DEFAULT_DEPTH_CLIPS = {"kws": 0, "asr": 4096}  # stage 4 (common.trainer.depth_clips_for)


def config_for(task: str, **overrides) -> TrainConfig:
    """The default recipe for ``task`` (asr: more epochs, smaller batches, a higher lr), then overrides.

    ``None`` overrides are ignored, so CLI options left unset keep the task's default. ``joint_epochs``
    stays None unless given: the trainer resolves it (``common.trainer.joint_epochs_for``).
    """
    base = dict(ASR_DEFAULTS) if task == "asr" else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(task=task, **base)


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


def length_batches(lengths: Tensor, batch_size: int, gen: torch.Generator, pool: int = 8,
                   budget: MemoryBudget = TRAINING) -> list[Tensor]:
    """Shuffled batches of similar-length inputs, so little compute goes into padding; ``lengths``
    in samples at 16 kHz.

    The data are shuffled, cut into pools of ``pool`` batches, each pool sorted by length and cut
    into batches (those over the memory ``budget`` cut further: :mod:`.batching`), and the batches
    shuffled again: random contents, near-uniform length per batch.
    """
    order = torch.randperm(len(lengths), generator=gen)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += budgeted_batches(lengths, batch_size, budget, rows=chunk)
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """Batches of ``pad_batch``; inputs of varying length (``dataset.lengths``) are batched by length."""
    gen = torch.Generator().manual_seed(seed)
    lengths = getattr(dataset, "lengths", None)
    if shuffle and lengths is not None:
        batches = length_batches(torch.as_tensor(lengths), batch_size, gen)
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], collate_fn=pad_batch)
    if not shuffle:
        return budgeted_loader(dataset, batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False, collate_fn=pad_batch)


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
        set_lr(optimizer, epoch * len(loader) + step, total_steps)
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
    return {"loss": loss_sum / seen, **prefixed("train_", score(model.task, predictions, references))}


def prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    """``scores`` with every key prefixed (``train_``, ``val_``, ...)."""
    return {prefix + k: v for k, v in scores.items()}


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int = 100) -> None:
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
    batches = length_batches(cache.sample_lengths(), batch_size, gen)
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
        set_lr(optimizer, epoch * steps + step, total, warmup=20)
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
        loss = loss + cache.distill_term(head, logits, rows, front.frame_mask, distill)
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
        **prefixed("train_", score(model.task, predictions, references)),
        "layer_usage": (layers_used / seen).tolist(),
    }


# ---- evaluation used for validation during training -----------------------------------------


@torch.inference_mode()
def validate(model: DynamicModel, cache: FrontEndCache, strategy: str, k: int, batch_size: int = 128) -> dict[str, float]:
    """The task's scores (accuracy, or WER and CER) of one strategy at k layers on cached inputs."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    predictions = []
    for rows in budgeted_batches(cache.sample_lengths(), batch_size):
        front, _ = cache.batch(rows)
        predictions += model.predict(front, strategy, k, gen)[0]
    return score(model.task, predictions, cache.texts)
