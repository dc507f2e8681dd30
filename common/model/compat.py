"""Which encoder configurations the layer runner reproduces exactly; the rest are refused at load time.

:class:`~.runner.LayerRunner` re-runs an HF WavLM / HuBERT / wav2vec 2.0 encoder layer by layer. It
equals the HF ``last_hidden_state`` (all layers kept) over the configuration space these families
offer — CNN norm ``group``/``layer``, stable (pre-) layer norm or not, conv/positional-conv sizes,
activations, HuBERT's projection layer norm and positional batch norm, WavLM's bucket settings,
eager or SDPA attention — which ``tests/test_model_compat.py`` checks property-based over the config
fields of each family. What it cannot reproduce is refused here with the field and the reason:

* WavLM ``num_buckets``/``max_bucket_distance`` that break HF's own bucket formula (it divides by
  ``log(max_distance / max_exact)``), so that no forward, HF's or ours, gives sensible output;
* ``add_adapter``: the adapter after the encoder shortens the frame sequence (``adapter_stride``) and may
  change its width, so the runner's frame mask, the selector and the heads would describe other frames;
* fields of another architecture in a config whose ``model_type`` says wav2vec2/HuBERT/WavLM (e.g.
  wav2vec2-conformer's ``position_embeddings_type``): HF would build the plain model and drop weights;
* inputs ldfleet cannot give as the checkpoint expects (see :mod:`.inputs`): a sampling rate other than
  16 kHz (ldfleet clips are 16 kHz), a feature size other than 1 (raw waveform), non-zero padding.

Whisper (the fourth family) is outside these rules: its runner (:mod:`.whisper`) is checked against
HF's ``WhisperEncoder`` in ``tests/test_model_whisper.py``, and it takes log-mel features computed by
the runner itself (its input spec says ``features="log_mel"``).

HF's own LayerDrop and in-model SpecAugment (``apply_spec_augment``, ``mask_*_prob``) are switched off
for every backbone (``backbone._ALWAYS``): layer choice and augmentation are ldfleet's, and with
them off the HF forward and the runner agree in training mode too.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PretrainedConfig

from .inputs import InputSpec, spec_of

FAMILY_TYPES = ("wavlm", "hubert", "wav2vec2")  # the model_types these rules cover
SAMPLE_RATE = 16_000  # what ldfleet's data layer delivers (common.data.labels.SAMPLE_RATE)

# Fields that only other architectures read; present in a config of ours, they mean a mislabelled checkpoint.
# (No WavLM/HuBERT/wav2vec2 config class defines any of them: tests/test_model_compat.py checks that.)
FOREIGN_FIELDS = {
    **dict.fromkeys(("position_embeddings_type", "rotary_embedding_base", "conv_depthwise_kernel_size",
                     "conformer_conv_dropout", "max_source_positions"), "wav2vec2-conformer"),
    "squeeze_factor": "SEW",
}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint whose configuration ldfleet's layer runner cannot reproduce exactly."""

    def __init__(self, name: str, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__(f"{name} cannot be run layer by layer by ldfleet: " + "; ".join(self.problems))


def architecture_problems(config: PretrainedConfig) -> list[str]:
    """Reasons (one per field) why the runner would not reproduce this encoder; [] when it does."""
    if getattr(config, "model_type", None) not in FAMILY_TYPES:
        return []  # other families carry their own checks
    out = []
    if getattr(config, "add_adapter", False) and config.model_type == "hubert":
        out.append("add_adapter=True, but HuBERT has no adapter (HF would ignore it and drop the adapter weights)")
    elif getattr(config, "add_adapter", False):
        out.append(f"add_adapter=True (an adapter with stride {getattr(config, 'adapter_stride', '?')} after the "
                   "encoder changes the frame sequence the layer masks, selector and heads work on)")
    if config.model_type == "wavlm" and not config.max_bucket_distance > config.num_buckets // 4 >= 1:
        out.append(f"num_buckets={config.num_buckets}, max_bucket_distance={config.max_bucket_distance} (WavLM's "
                   "relative position buckets need num_buckets >= 4 and max_bucket_distance > num_buckets // 4; "
                   "otherwise they divide by log(1) or go negative and HF's own forward fails)")
    for name, arch in FOREIGN_FIELDS.items():
        if hasattr(config, name):
            out.append(f"{name}={getattr(config, name)!r} is a {arch} field, but model_type is {config.model_type!r} "
                       f"(HF would build a plain {config.model_type} encoder and drop the {arch} weights)")
    return out


def input_problems(spec: InputSpec) -> list[str]:
    """Reasons why ldfleet cannot feed the encoder as its preprocessor config says; [] when it can."""
    out = []
    if spec.sampling_rate != SAMPLE_RATE:
        out.append(f"sampling_rate={spec.sampling_rate} in {spec.source} (ldfleet clips are {SAMPLE_RATE} Hz)")
    if spec.feature_size != 1:
        out.append(f"feature_size={spec.feature_size} in {spec.source} (ldfleet feeds raw waveforms, feature_size 1)")
    if spec.padding_value != 0.0:
        out.append(f"padding_value={spec.padding_value} in {spec.source} (ldfleet pads with zeros)")
    return out


def check_supported(config: PretrainedConfig, name: str = "this encoder") -> None:
    """Raise :class:`UnsupportedCheckpoint` naming every field the runner cannot honour."""
    problems = architecture_problems(config)
    if getattr(config, "model_type", None) in FAMILY_TYPES:
        problems += input_problems(spec_of(config))
    if problems:
        raise UnsupportedCheckpoint(name, problems)


def check_loaded_weights(name: str, missing: Iterable[str]) -> None:
    """Refuse a checkpoint whose encoder weights are incomplete (HF would fill them with random values)."""
    missing = sorted(missing)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnsupportedCheckpoint(name, [f"{len(missing)} encoder weights missing from the checkpoint ({shown}); "
                                           "HF would initialise them randomly"])
