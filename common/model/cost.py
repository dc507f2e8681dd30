"""Analytic compute cost (multiply-accumulates) of the parts of a dynamic model.

Counting MACs from the config, rather than timing, gives a cost that is the same on every device
and lets any keep mask be priced: front end + selector + (number of kept layers) x layer + head.
Encoder layers are identical, so a layer's cost depends only on the number of frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import Tensor

from .whisper import encoder_frames

SAMPLE_RATE = 16000


def frames_for(config, samples: int) -> int:
    """Frames out of the CNN front end for ``samples`` input samples."""
    length = samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    return length


def front_end_macs(config, samples: int) -> int:
    """CNN + feature projection + positional convolution."""
    macs, length, channels = 0, samples, 1
    for dim, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        macs += length * channels * dim * kernel
        channels = dim
    d = config.hidden_size
    macs += length * channels * d  # projection
    macs += length * d * (d // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
    return macs


def whisper_front_end(config, log_mel, samples: int, pad_to_window: bool, tail_s: float = 0.0) -> tuple[int, int]:
    """``(encoder frames, MACs)`` of Whisper's front end for ``samples`` input samples, as the runner
    runs it (``LayerRunner``: padded to the 30 s window, or the clip plus ``tail_s`` s of silence).

    Log-mel: per 10 ms frame an FFT of ``n_fft`` points (counted as n_fft x ceil(log2 n_fft)) and the mel
    filterbank; then conv1 (kernel 3) and conv2 (kernel 3, stride 2: 20 ms frames); the learned
    positions are an addition. ``log_mel``: the runner's ``whisper.LogMel``."""
    if pad_to_window:
        samples = log_mel.window_samples
    else:
        samples = min(samples + int(tail_s * SAMPLE_RATE), log_mel.window_samples)
    mel = log_mel.frames(samples)
    frames = encoder_frames(mel)
    d, n_fft = config.d_model, log_mel.n_fft
    macs = mel * (n_fft * math.ceil(math.log2(n_fft)) + (n_fft // 2 + 1) * log_mel.n_mels)
    macs += mel * log_mel.n_mels * d * 3 + frames * d * d * 3
    return frames, macs


def layer_macs(config, frames: int) -> int:
    """One transformer layer: Q/K/V/O projections, attention scores and mixing, feed-forward."""
    ffn = config.encoder_ffn_dim if config.model_type == "whisper" else config.intermediate_size
    d, f, t = config.hidden_size, ffn, frames
    macs = t * (4 * d * d + 2 * d * f) + 2 * t * t * d
    if getattr(config, "model_type", "") == "wavlm":  # gated relative position bias
        macs += t * d * 8
    return macs


def selector_macs(feature_dim: int, hidden: int, num_layers: int, frames: int) -> int:
    """Mean/std pooling over frames, then the two-layer MLP."""
    return 2 * frames * feature_dim + 2 * feature_dim * hidden + hidden * num_layers


def head_macs(hidden_size: int, outputs: int, frames: int, per_frame: bool = False) -> int:
    """Pooling + one projection (classification), or one projection per frame (CTC)."""
    if per_frame:
        return frames * hidden_size * outputs
    return frames * hidden_size + hidden_size * outputs


@dataclass(frozen=True)
class Cost:
    """MACs of each part for one input of a given length."""

    seconds: float
    frames: int
    front_end: int
    layer: int
    num_layers: int
    selector: int
    head: int

    @property
    def full(self) -> int:
        """The unmodified model: front end, every layer, head (no selector)."""
        return self.front_end + self.num_layers * self.layer + self.head

    def total(self, layers_run: float, with_selector: bool) -> float:
        """Cost of running ``layers_run`` layers (a mean is fine) plus the fixed parts."""
        return self.front_end + layers_run * self.layer + self.head + (self.selector if with_selector else 0)

    def of_mask(self, keep: Tensor, with_selector: bool) -> float:
        """Mean MACs per example for a bool keep mask [B, L]."""
        return self.total(float(keep.sum(1).float().mean()), with_selector)

    def as_dict(self) -> dict:
        return {**asdict(self), "full": self.full}


def cost_of(model, seconds: float = 1.0) -> Cost:
    """Cost of a ``DynamicModel`` for inputs of ``seconds`` seconds."""
    runner = model.runner
    cfg = runner.backbone.config
    samples = int(round(seconds * SAMPLE_RATE))
    if runner.family == "whisper":
        t, front = whisper_front_end(cfg, runner.log_mel, samples, runner.pad_to_window, runner.tail_s)
    else:
        t, front = frames_for(cfg, samples), front_end_macs(cfg, samples)
    return Cost(
        seconds=seconds,
        frames=t,
        front_end=front,
        layer=layer_macs(cfg, t),
        num_layers=cfg.num_hidden_layers,
        selector=selector_macs(cfg.hidden_size, model.selector_hidden, cfg.num_hidden_layers, t),
        head=head_macs(cfg.hidden_size, model.heads["base"].proj.out_features, t, per_frame=model.task == "asr"),
    )
