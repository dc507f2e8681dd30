"""Speech encoders ldfleet can make dynamic: WavLM, HuBERT and wav2vec 2.0 from Hugging Face.

A backbone comes either from a checkpoint (hub id or local folder, via ``from_pretrained``) or
from a named size built in code, so tests and benchmarks never need a download:

* ``tiny``: a small encoder that trains from scratch on a CPU in minutes;
* ``base``: the real base architecture (768 hidden, 12 layers, 512-channel CNN) with random weights,
  for speed and cost benchmarks.

HF's own LayerDrop is always switched off (``layerdrop=0.0``): layer choice belongs to ldfleet, and
HF's version drops layers for the whole batch and draws random numbers even in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from .compat import check_loaded_weights, check_supported
from .inputs import attach, read_input_spec


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]


FAMILIES: dict[str, Family] = {
    "wavlm": Family("wavlm", WavLMConfig, WavLMModel),
    "hubert": Family("hubert", HubertConfig, HubertModel),
    "wav2vec2": Family("wav2vec2", Wav2Vec2Config, Wav2Vec2Model),
}

# Settings that every backbone gets: no HF LayerDrop, no SpecAugment inside the HF model.
_ALWAYS = {"layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}

# Named sizes built in code. The CNN keeps the real kernels and strides (20 ms frames at 16 kHz)
# so frame counts, and hence attention costs, match the real models.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(64,) * 7,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=8,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
    ),
    "base": dict(),  # the config classes' defaults are the base architecture (768 x 12)
}


def family_of(model: PreTrainedModel) -> str:
    """Which supported family a loaded HF model belongs to."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family.name
    raise TypeError(
        f"unsupported encoder {type(model).__name__}; supported: "
        + ", ".join(f.model_class.__name__ for f in FAMILIES.values())
    )


def build_config(family: str, size: str) -> PretrainedConfig:
    """A config for a named size, built in code (no download)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return FAMILIES[family].config_class(**SIZES[size], **_ALWAYS)


def backbone_from_config(config: PretrainedConfig | dict) -> PreTrainedModel:
    """A randomly initialised encoder for a config (or a config dict saved with a run)."""
    if isinstance(config, dict):
        model_type = config.get("model_type")
        family = next((f for f in FAMILIES.values() if f.config_class.model_type == model_type), None)
        if family is None:
            raise ValueError(f"config has unsupported model_type {model_type!r}")
        config = family.config_class.from_dict(config)
    for key, value in _ALWAYS.items():
        setattr(config, key, value)
    check_supported(config, f"{config.model_type} config")
    family = next(f for f in FAMILIES.values() if isinstance(config, f.config_class))
    return family.model_class(config).eval()


def load_backbone(name: str, family: str = "wavlm") -> PreTrainedModel:
    """An encoder by size name (``tiny``, ``base``), hub id or local folder.

    Hub ids and folders go through ``from_pretrained``; a checkpoint of a task model
    (e.g. ``WavLMForCTC``) is fine, only its encoder is kept. Its input spec
    (``preprocessor_config.json``, see :mod:`.inputs`) is attached to the config, weights load as
    float32, and :class:`~.compat.UnsupportedCheckpoint` is raised for anything the layer runner
    cannot reproduce (see :mod:`.compat`) or for missing encoder weights.
    """
    if name in SIZES:
        return backbone_from_config(build_config(family, name))
    config = AutoConfig.from_pretrained(name)
    match = next((f for f in FAMILIES.values() if isinstance(config, f.config_class)), None)
    if match is None:
        raise ValueError(
            f"{name!r} is a {type(config).__name__}; ldfleet supports "
            + ", ".join(f.config_class.__name__ for f in FAMILIES.values())
        )
    attach(config, read_input_spec(name))
    for key, value in _ALWAYS.items():
        setattr(config, key, value)
    check_supported(config, name)
    model, info = match.model_class.from_pretrained(name, config=config, dtype=torch.float32, output_loading_info=True)
    check_loaded_weights(name, info.get("missing_keys", ()))
    return model.eval()


def describe(model: PreTrainedModel) -> str:
    """A short id for reports: family, layers x hidden, and the checkpoint name when known."""
    cfg = model.config
    source = getattr(cfg, "_name_or_path", "") or "in-code"
    return f"{family_of(model)}-{cfg.num_hidden_layers}x{cfg.hidden_size} ({Path(source).name or source})"
