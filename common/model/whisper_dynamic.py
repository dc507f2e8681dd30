"""A dynamic Whisper for speech recognition: layer runner + layer-choice strategies + decoder head.

The same pieces as ``DynamicModel`` (runner, ``build_strategies``, a head), with one difference that
matters for size: every strategy shares the one Whisper decoder (frozen), because it is as large as
the encoder; the strategies differ only in which encoder layers they keep.

Run folder (``save`` / ``load``): ``backbone/`` (HF ``save_pretrained`` of the whole Whisper model,
tokenizer and feature extractor), ``strategies.safetensors`` and ``model.json`` (head spec, padding
mode, what was trained).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..budget import layers_for_keep
from .backbone import load_backbone
from .runner import FrontEnd, LayerRunner
from .strategies import STRATEGY_NAMES, LayerChoice, build_strategies
from .whisper_head import WhisperDecoderHead

MODEL_JSON = "model.json"
STRATEGIES_FILE = "strategies.safetensors"
BACKBONE_DIR = "backbone"


def pad_batch(waves: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Clips of any lengths -> waveform [B, samples] (zero-padded) and attention mask [B, samples]."""
    longest = max(len(w) for w in waves)
    wave = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, w in enumerate(waves):
        wave[i, : len(w)] = torch.as_tensor(w, dtype=torch.float32)
        mask[i, : len(w)] = 1
    return wave, mask


class WhisperDynamic(nn.Module):
    """``front_end(waves) -> FrontEnd``; ``run(front, strategy, k) -> (hidden [B, T, D], keep [B, L])``;
    ``transcribe(front, strategy, k) -> (texts, keep)``."""

    def __init__(self, whisper: nn.Module, tokenizer, language: str | None = "en", pad_to_window: bool = True,
                 selector_hidden: int = 64):
        super().__init__()
        self.runner = LayerRunner(whisper, pad_to_window=pad_to_window)
        self.strategies = build_strategies(self.runner.num_layers, self.runner.hidden_size, selector_hidden)
        self.head = WhisperDecoderHead(whisper, tokenizer, language)
        self.selector_hidden = selector_hidden

    @classmethod
    def from_pretrained(cls, name: str, language: str | None = "en", pad_to_window: bool = True) -> "WhisperDynamic":
        """From a Whisper hub id or local folder (e.g. made by ``ldfleet model import``)."""
        from transformers import WhisperTokenizerFast

        whisper = load_backbone(name, "whisper")
        return cls(whisper, WhisperTokenizerFast.from_pretrained(name), language, pad_to_window)

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    def k_for(self, keep: float) -> int:
        return layers_for_keep(keep, self.num_layers)

    def strategy(self, name: str) -> LayerChoice:
        if name not in self.strategies:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGY_NAMES)}")
        return self.strategies[name]

    def front_end(self, waves: list[np.ndarray]) -> FrontEnd:
        wave, mask = pad_batch(waves)
        return self.runner.front_end(wave, mask)

    def run(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None):
        keep = self.strategy(strategy).choose(front, k, generator)
        return self.runner.run_layers(front, keep), keep

    def transcribe(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None):
        hidden, keep = self.run(front, strategy, k, generator)
        return self.head.predict(hidden, front.frame_mask), keep

    # ---- run folder -------------------------------------------------------------------------

    def save(self, run: str | Path, extra: dict | None = None, with_backbone: bool = True) -> None:
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        if with_backbone:
            self.runner.backbone.save_pretrained(run / BACKBONE_DIR)
            self.head.tokenizer.save_pretrained(run / BACKBONE_DIR)
            src = Path(getattr(self.runner.backbone.config, "_name_or_path", "") or ".")
            if (src / "preprocessor_config.json").is_file():
                (run / BACKBONE_DIR / "preprocessor_config.json").write_bytes((src / "preprocessor_config.json").read_bytes())
        state = {k: v.detach().contiguous().clone() for k, v in self.strategies.state_dict().items()}
        save_file(state, str(run / STRATEGIES_FILE))
        meta = {"task": "asr", "family": "whisper", "head": self.head.spec(), "pad_to_window": self.runner.pad_to_window,
                "selector_hidden": self.selector_hidden, **(extra or {})}
        (run / MODEL_JSON).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, run: str | Path) -> "WhisperDynamic":
        run = Path(run)
        meta = read_whisper_meta(run)
        model = cls.from_pretrained(str(run / BACKBONE_DIR), meta["head"].get("language"), meta.get("pad_to_window", True))
        model.strategies.load_state_dict(load_file(str(run / STRATEGIES_FILE)))
        return model.eval()


def read_whisper_meta(run: str | Path) -> dict:
    path = Path(run) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no {MODEL_JSON})")
    meta = json.loads(path.read_text())
    if meta.get("family") != "whisper":
        raise ValueError(f"{run} is not a Whisper speech-recognition run")
    return meta


def is_whisper_run(run: str | Path) -> bool:
    try:
        read_whisper_meta(run)
        return True
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False
