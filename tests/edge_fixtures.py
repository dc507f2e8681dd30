"""Shared by the edge-runtime tests: a tiny (untrained) run folder, its ONNX export, some WAV clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldfleet.common.data.audio import write_wav
from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.checkpoint import save_model
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny WavLM dynamic model with random weights (export and runtimes do not need training)."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("edge") / "run"
    save_model(DynamicModel(*with_head(load_backbone("tiny", "wavlm"))), run)
    return run


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    from ldfleet.common.model.export import export_onnx

    out = tmp_path_factory.mktemp("edge") / "onnx"
    export_onnx(tiny_run, out, int8=True)
    return out


@pytest.fixture(scope="session")
def wav_folder(tmp_path_factory) -> Path:
    """Twelve 1 s clips of tones and noise bursts, 16-bit PCM at 16 kHz."""
    folder = tmp_path_factory.mktemp("edge") / "wavs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i in range(12):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t) * np.hanning(16000) + 0.05 * rng.standard_normal(16000)
        write_wav(folder / f"clip_{i:02d}.wav", wave.astype(np.float32))
    return folder
