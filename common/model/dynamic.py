"""The dynamic model: one backbone, every layer-choice strategy, and a task head per strategy.

This is the object ldfleet trains, saves, evaluates and ships to devices. ``forward`` runs one
strategy at a layer budget; ``trainable_state`` is the part a device fine-tunes and sends back in
federated learning (selector + its head), a tiny fraction of the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..budget import layers_for_keep
from .heads import ClassificationHead, TaskHead, copy_head
from .inputs import InputSpec, spec_of
from .runner import FrontEnd, LayerRunner, normalize_waveform
from .strategies import STRATEGY_NAMES, LayerChoice, build_strategies

HEAD_NAMES = ("base", "early_exit", "static", "selector")


@dataclass
class Output:
    logits: Tensor
    keep: Tensor  # bool [B, L]: which layers ran for each example


class DynamicModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, selector_hidden: int = 64):
        super().__init__()
        self.runner = LayerRunner(backbone)
        self.num_classes = num_classes
        self.selector_hidden = selector_hidden
        dim, layers = self.runner.hidden_size, self.runner.num_layers
        self.strategies = build_strategies(layers, dim, selector_hidden)
        base = ClassificationHead(dim, num_classes)
        self.heads = nn.ModuleDict({"base": base, **{n: copy_head(base) for n in HEAD_NAMES[1:]}})

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

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

    def classify(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None) -> Output:
        """Hard-mask inference from a computed front end (lets callers reuse one front end)."""
        keep = self.strategy(strategy).choose(front, k, generator)
        hidden = self.runner.run_layers(front, keep)
        return Output(self.head_for(strategy)(hidden, front.frame_mask), keep)

    def forward(
        self,
        waveform: Tensor,
        attention_mask: Tensor | None = None,
        strategy: str = "selector",
        keep: float = 1.0,
    ) -> Output:
        return self.classify(self.front_end(waveform, attention_mask), strategy, self.k_for(keep))

    def trainable_state(self, strategy: str = "selector") -> dict[str, Tensor]:
        """The arrays a device fine-tunes for a learned strategy: its scorer and its head."""
        choice = self.strategy(strategy)
        state = {f"strategies.{strategy}.{k}": v for k, v in choice.state_dict().items()}
        state.update({f"heads.{choice.head}.{k}": v for k, v in self.heads[choice.head].state_dict().items()})
        return state

    def parameter_count(self, part: str) -> int:
        modules = {"backbone": self.runner.backbone, "selector": self.strategies["selector"], "head": self.heads["selector"]}
        return sum(p.numel() for p in modules[part].parameters())
