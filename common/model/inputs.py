"""What a speech encoder expects as input, read from its checkpoint and kept with every run.

A checkpoint folder's ``preprocessor_config.json`` says how its training audio was prepared:
``do_normalize`` (zero mean, unit variance per utterance, or raw samples), ``sampling_rate``,
``feature_size`` (1 = raw waveform) and ``padding_value``. ldfleet's front end must prepare audio
the same way, or the model sees inputs scaled differently from training (e.g. WavLM base was
trained on raw samples, wav2vec 2.0 large on normalised ones).

The spec is read with HF's ``AutoFeatureExtractor`` (so fields a json leaves out take HF's
defaults), attached to the backbone config under :data:`CONFIG_KEY`, and therefore saved in a
run's ``model.json`` (``backbone_config``) and restored with it. Sizes built in code and runs
saved before the spec existed get :class:`InputSpec`'s defaults: normalised 16 kHz waveforms.

Whisper is fed differently: the runner turns raw (un-normalised) 16 kHz waveforms into Whisper's
log-mel features itself (``features="log_mel"``, ``feature_size`` = mel bins), so its spec says
``do_normalize=False`` whether or not a ``WhisperFeatureExtractor`` config was found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from transformers import AutoFeatureExtractor, PretrainedConfig, Wav2Vec2FeatureExtractor

CONFIG_KEY = "ldfleet_input_spec"
PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class InputSpec:
    """How raw audio becomes the encoder's ``input_values`` [batch, samples]."""

    sampling_rate: int = 16_000  # Hz
    do_normalize: bool = True  # zero mean, unit variance per example over its real samples
    feature_size: int = 1  # 1: raw waveform samples
    padding_value: float = 0.0
    features: str = "waveform"  # what the encoder's front end takes: "waveform" or "log_mel" (Whisper)
    source: str = "in-code default"  # where these values came from

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InputSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _from_extractor(extractor, source: str) -> InputSpec:
    if type(extractor).__name__ == "WhisperFeatureExtractor":
        return whisper_spec(int(extractor.feature_size), int(extractor.sampling_rate), source)
    return InputSpec(
        sampling_rate=int(getattr(extractor, "sampling_rate", 16_000)),
        do_normalize=bool(getattr(extractor, "do_normalize", True)),
        feature_size=int(getattr(extractor, "feature_size", 1)),
        padding_value=float(getattr(extractor, "padding_value", 0.0)),
        source=source,
    )


def read_input_spec(name: str) -> InputSpec:
    """The input spec of a checkpoint (hub id or folder): its preprocessor config, else HF's defaults.

    A checkpoint without ``preprocessor_config.json`` gets what HF's ``Wav2Vec2FeatureExtractor()``
    would do with it (normalised 16 kHz waveforms), and says so in ``source``.
    """
    try:
        extractor = AutoFeatureExtractor.from_pretrained(name)
    except (OSError, ValueError):
        return _from_extractor(Wav2Vec2FeatureExtractor(), f"{name}: no {PREPROCESSOR}, HF defaults")
    local = Path(name) / PREPROCESSOR
    return _from_extractor(extractor, str(local) if local.is_file() else f"{name} ({PREPROCESSOR})")


def attach(config: PretrainedConfig, spec: InputSpec) -> None:
    """Keep ``spec`` on the config, so that ``config.to_dict()`` (and so a saved run) carries it."""
    setattr(config, CONFIG_KEY, spec.as_dict())


def whisper_spec(mel_bins: int, sampling_rate: int = 16_000, source: str = "Whisper log-mel") -> InputSpec:
    """Raw waveforms in, log-mel computed by the runner: never waveform-normalised."""
    return InputSpec(sampling_rate=sampling_rate, do_normalize=False, feature_size=mel_bins, features="log_mel", source=source)


def spec_of(config: PretrainedConfig) -> InputSpec:
    """The spec attached to a backbone config; the default (normalise) for in-code sizes and old runs,
    Whisper's log-mel spec for a Whisper config without one."""
    values = getattr(config, CONFIG_KEY, None)
    if isinstance(values, dict):
        return InputSpec.from_dict(values)
    if getattr(config, "model_type", None) == "whisper":
        return whisper_spec(int(config.num_mel_bins), source="Whisper log-mel (in-code default)")
    return InputSpec()
