"""Whisper's encoder front end, split out so the layer runner can own Whisper's layer loop.

Whisper reads a log-mel spectrogram (80 or 128 bins, 10 ms hop, 25 ms window at 16 kHz), runs two
1-D convolutions (the second with stride 2: 20 ms frames) and adds learned positions; then its
encoder layers run, then a final LayerNorm. The HF ``WhisperEncoder`` insists on 30 s inputs
(3000 mel frames, 1500 encoder frames). Here an input may also run *unpadded*: the positions are
sliced to the clip's own length, which is ~10x cheaper for a 3 s prompt.

Batches of different lengths are padded with zeros after the log-mel and after the first
convolution, and the padded frames are masked out of attention, so a batched clip gives exactly
what it gives alone. Formulas: Radford et al. 2022 (Whisper), and the settings of the checkpoint's
``WhisperFeatureExtractor`` (``preprocessor_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class LogMel:
    """Whisper's log-mel spectrogram with one checkpoint's settings.

    ``mel_filters`` is ``[n_fft // 2 + 1, n_mels]`` (the feature extractor's ``mel_filters``);
    ``window_samples`` is Whisper's 30 s chunk (480 000 samples at 16 kHz).
    """

    mel_filters: Tensor
    n_fft: int = 400
    hop_length: int = 160
    window_samples: int = 30 * SAMPLE_RATE

    @classmethod
    def from_extractor(cls, extractor) -> "LogMel":
        """Settings from an HF ``WhisperFeatureExtractor``."""
        return cls(
            mel_filters=torch.tensor(extractor.mel_filters, dtype=torch.float32),
            n_fft=int(extractor.n_fft),
            hop_length=int(extractor.hop_length),
            window_samples=int(extractor.n_samples),
        )

    @property
    def n_mels(self) -> int:
        return self.mel_filters.shape[1]

    def frames(self, samples: int) -> int:
        """Mel frames for a clip of ``samples`` samples (the STFT's last frame is dropped)."""
        return samples // self.hop_length

    def __call__(self, waveform: Tensor) -> Tensor:
        """One clip, float32 ``[samples]`` at 16 kHz -> log-mel ``[n_mels, samples // hop]``.

        log10 of the mel power, floored at (max - 8), then scaled as (x + 4) / 4 — what the
        feature extractor does, per clip.
        """
        window = torch.hann_window(self.n_fft, device=waveform.device)
        stft = torch.stft(waveform.float(), self.n_fft, self.hop_length, window=window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = self.mel_filters.to(waveform.device).T @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


def batch_log_mel(
    log_mel: LogMel, waveform: Tensor, attention_mask: Tensor | None, pad_to_window: bool, tail_s: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Log-mel of each clip of a batch, padded with zeros to the longest (or to 30 s).

    waveform [B, samples] float at 16 kHz; attention_mask [B, samples] (1 = real sample) or None.
    Returns mel [B, n_mels, F] and the real mel frames per clip [B]. With ``pad_to_window`` every
    clip is first padded with silence to 30 s, exactly as the HF feature extractor does, so the
    whole window is real input; clips longer than 30 s raise ``ValueError``. Otherwise ``tail_s``
    seconds of silence are appended to each clip (capped at 30 s in all), which is what tells
    Whisper's decoder that the speech has ended.
    """
    lengths = (
        torch.full((waveform.shape[0],), waveform.shape[1], dtype=torch.long)
        if attention_mask is None
        else attention_mask.long().sum(-1).cpu()
    )
    mels = []
    for wave, n in zip(waveform, lengths.tolist()):
        clip = wave[:n]
        if n > log_mel.window_samples:
            raise ValueError(f"clip of {n} samples is longer than Whisper's 30 s window")
        if pad_to_window:
            clip = F.pad(clip, (0, log_mel.window_samples - n))
        elif tail_s > 0:
            clip = F.pad(clip, (0, min(int(tail_s * SAMPLE_RATE), log_mel.window_samples - n)))
        mels.append(log_mel(clip))
    frames = torch.tensor([m.shape[-1] for m in mels])
    longest = int(frames.max())
    mel = torch.stack([F.pad(m, (0, longest - m.shape[-1])) for m in mels])
    return mel, frames


def encoder_frames(mel_frames: Tensor | int) -> Tensor | int:
    """Encoder frames after the stride-2 convolution: ceil(F / 2) (per clip, or of one count)."""
    return (mel_frames + 1) // 2


def conv_front_end(encoder: nn.Module, mel: Tensor, mel_frames: Tensor) -> tuple[Tensor, Tensor | None]:
    """conv1 -> GELU -> conv2 -> GELU of an HF ``WhisperEncoder``, exact per clip under padding.

    mel [B, n_mels, F] -> features [B, T, D] and frame_mask [B, T] (None when nothing is padded).
    Frames past a clip's end are zeroed after the log-mel and after conv1, which is what each
    convolution's own zero padding gives the clip when it runs alone.
    """
    longest = mel.shape[-1]
    padded = bool((mel_frames < longest).any())
    if padded:
        real = torch.arange(longest, device=mel.device).unsqueeze(0) < mel_frames.to(mel.device).unsqueeze(1)
        mel = mel * real.unsqueeze(1).to(mel.dtype)
    x = F.gelu(encoder.conv1(mel))
    if padded:
        x = x * real.unsqueeze(1).to(x.dtype)
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)
    if not padded:
        return x, None
    frames = encoder_frames(mel_frames).to(mel.device)
    frame_mask = torch.arange(x.shape[1], device=mel.device).unsqueeze(0) < frames.unsqueeze(1)
    return x, frame_mask


def add_positions(encoder: nn.Module, features: Tensor) -> Tensor:
    """features [B, T, D] + the first T learned positions (T <= max_source_positions)."""
    t = features.shape[1]
    limit = encoder.embed_positions.num_embeddings
    if t > limit:
        raise ValueError(f"input gives {t} encoder frames; Whisper has positions for {limit} (30 s)")
    return features + encoder.embed_positions.weight[:t].unsqueeze(0)
