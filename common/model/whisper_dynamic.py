"""A dynamic Whisper for speech recognition: a :class:`~.dynamic.DynamicModel` with Whisper's decoder head.

It is the generic ``DynamicModel`` (runner, ``build_strategies``, a :class:`~.heads.TaskHead`) with
three Whisper-specific parts:

* every strategy's head is the ONE ``WhisperDecoderHead`` (the decoder is as large as the encoder and
  frozen; the strategies differ only in which encoder layers they keep);
* ``front_end`` also takes a list of clips of any length (padded here; the runner's log-mel front end
  either pads to the 30 s window or slices positions, ``pad_to_window``); audio is never
  waveform-normalised (the input spec of a Whisper config says ``features="log_mel"``);
* its run folder (``save`` / ``load``): ``backbone/`` (HF ``save_pretrained`` of the whole Whisper
  model, tokenizer and feature extractor), ``strategies.safetensors`` and ``model.json`` (head spec,
  padding mode, what was trained), and ``skip_maps.safetensors`` when the run has skip maps.

Not yet folded into the generic code (what remains): the run folder format (the generic
``checkpoint.save_model`` stores the backbone config + one safetensors and has no tokenizer, so it
cannot rebuild the decoder head; ``checkpoint.load_model`` would need to store ``backbone/`` the way
``save`` does here), evaluation (:mod:`ldfleet.common.asr_eval`, not ``common.evaluate``: no oracle,
MACs or condition rows) and training (:mod:`ldfleet.common.whisper_train` tables, fitted by :mod:`ldfleet.common.set_fit`
on a frozen model, not ``common.trainer.Trainer``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .backbone import load_backbone
from .dynamic import DynamicModel
from .runner import FrontEnd
from .skip_maps import SkipMaps
from .whisper_head import WhisperDecoderHead

MODEL_JSON = "model.json"
STRATEGIES_FILE = "strategies.safetensors"
SKIP_MAPS_FILE = "skip_maps.safetensors"  # optional: affine stand-ins for skipped layers (skip_maps.py)
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


class WhisperDynamic(DynamicModel):
    """``front_end(waves) -> FrontEnd``; ``run(front, strategy, k) -> (hidden [B, T, D], keep [B, L])``;
    ``transcribe(front, strategy, k) -> (texts, keep)``."""

    def __init__(self, whisper: nn.Module, tokenizer, language: str | None = "en", pad_to_window: bool = True,
                 selector_hidden: int = 64, budget: bool = False):
        """``budget``: static and selector choose their set per k (not top-k of one ranking)."""
        head = WhisperDecoderHead(whisper, tokenizer, language)
        super().__init__(whisper, head, selector_hidden, selector_budget=budget, static_budget=budget)
        self.runner.pad_to_window = pad_to_window
        self.heads = nn.ModuleDict({name: head for name in self.heads})  # one shared decoder head

    @property
    def head(self) -> WhisperDecoderHead:
        return self.heads["base"]

    @classmethod
    def from_pretrained(cls, name: str, language: str | None = "en", pad_to_window: bool = True,
                        budget: bool = False) -> "WhisperDynamic":
        """From a Whisper hub id or local folder (e.g. made by ``ldfleet model import``)."""
        from transformers import WhisperTokenizerFast

        whisper = load_backbone(name, "whisper")
        return cls(whisper, WhisperTokenizerFast.from_pretrained(name), language, pad_to_window, budget=budget)

    def front_end(self, waves: list[np.ndarray] | Tensor, attention_mask: Tensor | None = None) -> FrontEnd:
        """Clips (a list of float32 arrays at 16 kHz, any lengths) or a padded batch [B, samples]."""
        if isinstance(waves, (list, tuple)):
            waves, attention_mask = pad_batch(list(waves))
        return super().front_end(waves, attention_mask)

    def transcribe(self, front: FrontEnd, strategy: str, k: int, generator: torch.Generator | None = None):
        """Greedy transcripts and the keep mask [B, L]: ``DynamicModel.predict`` under its Whisper name."""
        return self.predict(front, strategy, k, generator)

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
        maps = self.runner.skip_maps
        if maps is not None:
            maps.save(run / SKIP_MAPS_FILE)
        meta = {"task": "asr", "family": "whisper", "head": self.head.spec(), "pad_to_window": self.runner.pad_to_window,
                "selector_hidden": self.selector_hidden, "budget": self.selector_budget, "skip_maps": maps is not None,
                **(extra or {})}
        (run / MODEL_JSON).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, run: str | Path) -> "WhisperDynamic":
        run = Path(run)
        meta = read_whisper_meta(run)
        model = cls.from_pretrained(str(run / BACKBONE_DIR), meta["head"].get("language"), meta.get("pad_to_window", True),
                                    budget=bool(meta.get("budget", False)))
        model.strategies.load_state_dict(load_file(str(run / STRATEGIES_FILE)))
        if meta.get("skip_maps"):
            maps = SkipMaps.load(run / SKIP_MAPS_FILE)
            if maps.num_layers != model.num_layers or maps.weight.shape[2] != model.runner.hidden_size:
                raise ValueError(f"{run / SKIP_MAPS_FILE}: shape {list(maps.weight.shape)} does not fit this encoder")
            model.runner.skip_maps = maps
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
