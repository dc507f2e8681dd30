"""The dynamic model: one backbone, every layer-choice strategy, and a task head per strategy.

This is the object ldfleet trains, saves, evaluates and ships to devices. It is task-agnostic:
``run`` chooses a keep mask ``[B, L]`` with one strategy at a layer budget and runs those layers;
the strategy's head (keyword classes, CTC characters, ...) then predicts or computes the loss.
``trainable_state`` is the part a device fine-tunes and sends back in federated learning
(selector + its head), a tiny fraction of the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..budget import layers_for_keep
from .heads import TaskHead, copy_head
from .inputs import InputSpec, spec_of
from .runner import FrontEnd, LayerRunner, normalize_waveform
from .strategies import STRATEGY_NAMES, AdaptiveDepth, ConfidentExit, LayerChoice, build_strategies

HEAD_NAMES = ("base", "early_exit", "static", "selector")


@dataclass
class Output:
    logits: Tensor  # the head's outputs: [B, C] (classification) or [B, T, V] (CTC)
    keep: Tensor  # bool [B, L]: which layers ran for each example
    frame_mask: Tensor | None = None  # [B, T], True = real frame


class DynamicModel(nn.Module):
    """One backbone, the strategies of :mod:`.strategies`, and a copy of ``head`` per head-name."""

    def __init__(self, backbone: nn.Module, head: TaskHead, selector_hidden: int = 64, selector_budget: bool = False,
                 static_budget: bool = False):
        super().__init__()
        self.runner = LayerRunner(backbone)
        self.selector_hidden = selector_hidden
        self.selector_budget = selector_budget  # the selector also sees k / L
        self.static_budget = static_budget  # static keeps one ranking per k
        dim, layers = self.runner.hidden_size, self.runner.num_layers
        self.strategies = build_strategies(layers, dim, selector_hidden, selector_budget, static_budget)
        base = head
        self.heads = nn.ModuleDict({"base": base, **{n: copy_head(base) for n in HEAD_NAMES[1:]}})

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    @property
    def task(self) -> str:
        return self.heads["base"].task

    def head_spec(self) -> dict:
        return self.heads["base"].spec()

    def strategy(self, name: str) -> LayerChoice:
        if name not in self.strategies:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
        return self.strategies[name]

    def head_for(self, strategy: str) -> TaskHead:
        return self.heads[self.strategy(strategy).head]

    def k_for(self, keep: float) -> int:
        return layers_for_keep(keep, self.num_layers)

    @property
    def input_spec(self) -> InputSpec:
        """How the backbone's checkpoint expects its audio (normalised or raw; see :mod:`.inputs`)."""
        return spec_of(self.runner.backbone.config)

    def front_end(self, waveform: Tensor, attention_mask: Tensor | None = None) -> FrontEnd:
        """Waveform [B, samples at 16 kHz] -> front end, normalised only if the checkpoint's spec says so."""
        if self.input_spec.do_normalize:
            waveform = normalize_waveform(waveform, attention_mask)
        return self.runner.front_end(waveform, attention_mask)

    def choose(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None,
               max_depth: int | None = None) -> Tensor:
        """Keep mask ``[B, L]`` of ``strategy`` at ``k`` layers (``adaptive``: a mean of k, its sets from
        the strategy it names), at most ``max_depth`` layers per input (a device's latency target)."""
        choice = self.strategy(strategy)
        if isinstance(choice, AdaptiveDepth):
            return choice.choose_with(self.strategy(choice.sets_from), front, k, generator, max_depth)
        return choice.choose(front, k if max_depth is None else min(k, max_depth), generator)

    def run(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Hard-mask encoder pass: ``(hidden [B, T, D], keep [B, L])`` for ``strategy`` at ``k`` layers
        (``adaptive``, ``confident_exit``: a mean of k)."""
        choice = self.strategy(strategy)
        if isinstance(choice, ConfidentExit):
            return self._run_confident(front, choice, k)
        keep = self.choose(front, strategy, k, generator)
        return self.runner.run_layers(front, keep), keep

    def _run_confident(self, front: FrontEnd, choice: ConfidentExit, k: int) -> tuple[Tensor, Tensor]:
        """Each input runs layers in order until its early-exit head is confident enough for a mean of k
        (at k >= L the threshold is never reached: every layer). Raises ValueError when uncalibrated."""
        head, threshold = self.heads[choice.head], choice.threshold(k)
        hidden, depth = self.runner.run_with_exits(front, lambda h, frame_mask: head.confidence(head.logits(h, frame_mask), frame_mask) >= threshold)
        keep = torch.arange(self.num_layers, device=depth.device).unsqueeze(0) < depth.unsqueeze(1)
        return hidden, keep

    def classify(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None) -> Output:
        """Hard-mask inference from a computed front end (lets callers reuse one front end)."""
        hidden, keep = self.run(front, strategy, k, generator)
        return Output(self.head_for(strategy).logits(hidden, front.frame_mask), keep, front.frame_mask)

    def predict(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None) -> tuple[list[str], Tensor]:
        """Label names or transcripts, and the keep mask ``[B, L]``."""
        hidden, keep = self.run(front, strategy, k, generator)
        return self.head_for(strategy).predict(hidden, front.frame_mask), keep

    def forward(
        self,
        waveform: Tensor,
        attention_mask: Tensor | None = None,
        strategy: str = "selector",
        keep: float = 1.0,
    ) -> Output:
        return self.classify(self.front_end(waveform, attention_mask), strategy, self.k_for(keep))

    def trainable_state(self, strategy: str = "selector") -> dict[str, Tensor]:
        """The arrays a device fine-tunes for a learned strategy: its scorer's and its head's parameters
        (detached). Buffers stay local: a fixed selector prior is not trained, so not exchanged."""
        choice = self.strategy(strategy)
        state = {f"strategies.{strategy}.{k}": v.detach() for k, v in choice.named_parameters()}
        state.update({f"heads.{choice.head}.{k}": v.detach() for k, v in self.heads[choice.head].named_parameters()})
        return state

    def parameter_count(self, part: str) -> int:
        modules = {"backbone": self.runner.backbone, "selector": self.strategies["selector"], "head": self.heads["selector"]}
        return sum(p.numel() for p in modules[part].parameters())
