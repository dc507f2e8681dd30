"""Stage 3, ``joint``: the shared encoder learns the layer sets every strategy actually runs.

After stage 2 each strategy has its own way of choosing layers and its own head, but the encoder
was trained (stage 1) only under LayerDrop, where losing three or more of eight layers is rare (4%
of examples at 0.1). Layer-dropping methods are usually trained with their own dropping in the loop
(LayerDrop itself, early-exit heads on their exits); ldfleet keeps one encoder for every strategy (a
device ships one backbone), so this stage fine-tunes that one encoder with all of them at once. Per
batch, with k drawn uniformly in 1..L:

* ``random`` (the base head, hence ``full`` and the oracle too): k layers drawn at random per input,
  i.e. random dropping trained at the budgets it is evaluated at (stage 1's LayerDrop 0.1 rarely
  drops more than two of eight layers);
* ``early_exit``: the first k layers, its head;
* ``static``, ``selector``: the k-layer sets their (frozen) scorers choose, their heads.

The loss is the sum of the four task losses (plus ``distill`` x KL towards the stored full-model
outputs for the three budgeted strategies). The front end stays frozen (it is cached) and so do the
scorers: the sets are the ones stage 2 chose; what changes is how well the encoder runs them. The
encoder layers learn at a tenth of the stage-1 lr (warm-up, then cosine decay over the stage).

The full-model outputs are computed when the stage starts; a run resumed in the middle of stage 3
computes them again from its partly tuned encoder, so it distils towards a slightly different target
than an uninterrupted run.
"""

from __future__ import annotations

import torch

from .metrics import score
from .model.dynamic import DynamicModel
from .front_cache import FrontEndCache
from .train import StepCallback, TrainConfig, length_batches, prefixed, set_lr

JOINT_STRATEGIES = ("random", "early_exit", "static", "selector")


def encoder_parameters(model: DynamicModel) -> list[torch.nn.Parameter]:
    """The parameters after the (cached) front end: the encoder layers and what runs after them
    (``LayerRunner.after_layers``: a final layer norm, an adapter)."""
    modules = [model.runner.layers, *model.runner.after_layers()]
    return [p for module in modules for p in module.parameters()]


def joint_optimizer(model: DynamicModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the encoder layers (at a tenth of the stage-1 lr: they are fine-tuned, not learned)
    and every head (at ``head_lr``)."""
    lr = (cfg.pretrained_lr if cfg.from_checkpoint else cfg.lr) * 0.1
    heads = list(dict.fromkeys(model.head_for(name) for name in JOINT_STRATEGIES))  # fixed order: the saved state maps by position
    return torch.optim.AdamW(
        [{"params": encoder_parameters(model), "lr": lr},
         {"params": [p for head in heads for p in head.parameters()], "lr": cfg.head_lr}],
        weight_decay=0.01,
    )


def _optimised(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_joint_epoch(
    model: DynamicModel,
    cache: FrontEndCache,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    on_step: StepCallback | None = None,
) -> dict:
    """One epoch of the joint stage (see the module docstring) over the cached front ends.

    Each strategy's loss is back-propagated on its own (one graph in memory at a time) and the
    gradients add up before one optimiser step. Returns the mean summed loss, the train WER or
    accuracy of the selector, and per-strategy mean losses (``loss_<strategy>``).
    """
    model.train()
    model.requires_grad_(False)
    for p in _optimised(optimizer):  # the encoder layers and the heads; front end and scorers stay frozen
        p.requires_grad_(True)
    try:
        return _joint_epoch(model, cache, optimizer, cfg, epoch, on_step)
    finally:
        model.requires_grad_(True)  # as a loaded model is: later code freezes what it needs
        model.eval()


def _joint_epoch(model, cache, optimizer, cfg, epoch, on_step) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + epoch)
    batches = length_batches(cache.sample_lengths(), cfg.batch_size, gen)
    steps, total = len(batches), cfg.joint_epochs * len(batches)
    sums = dict.fromkeys(JOINT_STRATEGIES, 0.0)
    seen = 0
    predictions, references = [], []
    for step, rows in enumerate(batches):
        front, texts = cache.batch(rows)
        k = int(torch.randint(1, model.num_layers + 1, (1,), generator=gen))
        set_lr(optimizer, epoch * steps + step, total, warmup=20)
        optimizer.zero_grad(set_to_none=True)
        targets = model.heads["base"].targets(texts)  # every head is a copy of the base head: same targets
        for name in JOINT_STRATEGIES:
            head = model.head_for(name)
            with torch.no_grad():  # [B, L]; random: its own k-layer set per input
                keep = model.strategy(name).choose(front, k, gen)
            logits = head.logits(model.runner.run_layers(front, keep), front.frame_mask)
            loss = head.loss_from_logits(logits, front.frame_mask, targets)
            loss = loss + cache.distill_term(head, logits, rows, front.frame_mask, 0.0 if name == "random" else cfg.distill)
            loss.backward()
            sums[name] += loss.item() * len(texts)
            if name == "selector":
                predictions += head.decode(logits.detach(), front.frame_mask)
        torch.nn.utils.clip_grad_norm_(_optimised(optimizer), 5.0)
        optimizer.step()
        seen += len(texts)
        references += texts
        if on_step:
            on_step("joint", step + 1, steps)
    return {"loss": sum(sums.values()) / seen, **{f"loss_{n}": v / seen for n, v in sums.items()},
            **prefixed("train_", score(model.task, predictions, references))}
