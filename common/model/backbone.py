"""Speech encoders ldfleet can make dynamic: WavLM, HuBERT, wav2vec 2.0 and Whisper from Hugging Face.

A backbone comes either from a checkpoint (hub id or local folder, via ``from_pretrained``) or
from a named size built in code, so tests and benchmarks never need a download:

* ``tiny``: a small encoder that trains from scratch on a CPU in minutes;
* ``base``: the real base architecture (768 hidden, 12 layers, 512-channel CNN) with random weights,
  for speed and cost benchmarks.

HF's own LayerDrop is always switched off (``layerdrop=0.0``): layer choice belongs to ldfleet, and
HF's version drops layers for the whole batch and draws random numbers even in eval mode.

Whisper is an encoder-decoder: its backbone is the whole ``WhisperForConditionalGeneration``, of
which the runner drives the encoder and the Whisper decoder head (``heads.WhisperDecoderHead``)
the decoder. Its ``tiny`` size is a small config built in code, for tests.
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
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from .compat import check_loaded_weights, check_supported
from .inputs import attach, read_input_spec
from .whisper import LogMel


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]


FAMILIES: dict[str, Family] = {
    "wavlm": Family("wavlm", WavLMConfig, WavLMModel),
    "hubert": Family("hubert", HubertConfig, HubertModel),
    "wav2vec2": Family("wav2vec2", Wav2Vec2Config, Wav2Vec2Model),
    "whisper": Family("whisper", WhisperConfig, WhisperForConditionalGeneration),
}

# Settings that every backbone gets: no HF LayerDrop, no SpecAugment inside the HF model.
_ALWAYS = {"layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}
_ALWAYS_WHISPER = {"encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "apply_spec_augment": False}


def _always(family: str) -> dict[str, Any]:
    return _ALWAYS_WHISPER if family == "whisper" else _ALWAYS

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

# Whisper sizes built in code: ``tiny`` is for tests (4 encoder layers x 64); ``base`` is the real
# Whisper base architecture (6 + 6 layers x 512, 80 mel bins) with random weights.
WHISPER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        d_model=64,
        encoder_layers=4,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_target_positions=64,
    ),
    "base": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_mel_bins=80,
    ),
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
    sizes = WHISPER_SIZES if family == "whisper" else SIZES
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(sizes)}")
    return FAMILIES[family].config_class(**sizes[size], **_always(family))


def backbone_from_config(config: PretrainedConfig | dict) -> PreTrainedModel:
    """A randomly initialised encoder for a config (or a config dict saved with a run)."""
    if isinstance(config, dict):
        model_type = config.get("model_type")
        family = next((f for f in FAMILIES.values() if f.config_class.model_type == model_type), None)
        if family is None:
            raise ValueError(f"config has unsupported model_type {model_type!r}")
        config = family.config_class.from_dict(config)
    family = next(f for f in FAMILIES.values() if isinstance(config, f.config_class))
    for key, value in _always(family.name).items():
        setattr(config, key, value)
    check_supported(config, f"{config.model_type} config")
    return family.model_class(config).eval()


def load_backbone(name: str, family: str = "wavlm") -> PreTrainedModel:
    """An encoder by size name (``tiny``, ``base``), hub id or local folder.

    Hub ids and folders go through ``from_pretrained``; a checkpoint of a task model
    (e.g. ``WavLMForCTC``) is fine, only its encoder is kept. A Whisper checkpoint (e.g. a folder
    made by ``ldfleet model import``) is recognised by its config and loads whole, decoder included.
    Its input spec (``preprocessor_config.json``, see :mod:`.inputs`) is attached to the config, weights
    load as float32, and :class:`~.compat.UnsupportedCheckpoint` is raised for anything the layer runner
    cannot reproduce (see :mod:`.compat`) or for missing weights.
    """
    if name in (WHISPER_SIZES if family == "whisper" else SIZES):
        return backbone_from_config(build_config(family, name))
    config = AutoConfig.from_pretrained(name)
    match = next((f for f in FAMILIES.values() if isinstance(config, f.config_class)), None)
    if match is None:
        raise ValueError(
            f"{name!r} is a {type(config).__name__}; ldfleet supports "
            + ", ".join(f.config_class.__name__ for f in FAMILIES.values())
        )
    attach(config, read_input_spec(name))
    for key, value in _always(match.name).items():
        setattr(config, key, value)
    check_supported(config, name)
    model, info = match.model_class.from_pretrained(name, config=config, dtype=torch.float32, output_loading_info=True)
    check_loaded_weights(name, info.get("missing_keys", ()))
    return model.eval()


def whisper_log_mel(model: PreTrainedModel) -> LogMel:
    """The log-mel settings of a Whisper checkpoint: its ``preprocessor_config.json`` when the
    model came from a folder that has one, else Whisper's standard extractor for its mel bins."""
    folder = Path(getattr(model.config, "_name_or_path", "") or ".")
    if (folder / "preprocessor_config.json").is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    else:
        extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    return LogMel.from_extractor(extractor)


def num_layers_of(config: PretrainedConfig) -> int:
    """Encoder layers of a config (Whisper calls them ``encoder_layers``)."""
    return config.encoder_layers if isinstance(config, WhisperConfig) else config.num_hidden_layers


def describe(model: PreTrainedModel) -> str:
    """A short id for reports: family, layers x hidden, and the checkpoint name when known."""
    cfg = model.config
    source = getattr(cfg, "_name_or_path", "") or "in-code"
    return f"{family_of(model)}-{num_layers_of(cfg)}x{cfg.hidden_size} ({Path(source).name or source})"
