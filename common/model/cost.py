"""Analytic compute cost (multiply-accumulates) of the parts of a dynamic model.

Counting MACs from the config, rather than timing, gives a cost that is the same on every device
and lets any keep mask be priced: front end + selector + (number of kept layers) x layer + head.
Encoder layers are identical, so a layer's cost depends only on the number of frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

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


def layer_macs(config, frames: int) -> int:
    """One transformer layer: Q/K/V/O projections, attention scores and mixing, feed-forward."""
    d, f, t = config.hidden_size, config.intermediate_size, frames
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
    cfg = model.runner.backbone.config
    samples = int(round(seconds * SAMPLE_RATE))
    t = frames_for(cfg, samples)
    return Cost(
        seconds=seconds,
        frames=t,
        front_end=front_end_macs(cfg, samples),
        layer=layer_macs(cfg, t),
        num_layers=cfg.num_hidden_layers,
        selector=selector_macs(cfg.hidden_size, model.selector_hidden, cfg.num_hidden_layers, t),
        head=head_macs(cfg.hidden_size, model.heads["base"].proj.out_features, t, per_frame=model.task == "asr"),
    )
