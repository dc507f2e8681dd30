"""Shared by the edge-runtime tests: tiny (untrained) keyword and speech-recognition run folders, their
ONNX exports, some WAV clips and utterances."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
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


def _exported(run: Path, tmp_path_factory, name: str) -> Path:
    """An ONNX export (fp32 + int8) of ``run`` in a new temporary folder ``name``."""
    from ldfleet.common.model.export import export_onnx

    out = tmp_path_factory.mktemp("edge") / name
    export_onnx(run, out, int8=True)
    return out


def post_wav(url: str, body: bytes, query: str = "") -> tuple[int, dict]:
    """POST ``body`` to ``url``/v1/infer (``query``: e.g. ``?deadline_ms=5``): (status, JSON answer)."""
    req = urllib.request.Request(f"{url}/v1/infer{query}", data=body, headers={"Content-Type": "audio/wav"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    return _exported(tiny_run, tmp_path_factory, "onnx")


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


@pytest.fixture(scope="session")
def tiny_asr_run(tmp_path_factory) -> Path:
    """A tiny WavLM with a CTC head over characters and a budget-conditioned selector (the speech-
    recognition default), random weights; its per-k prior differs per k and its corrections are
    switched off at k = 3, so each k's choice of layers is its own. Its adaptive depth chooser is
    calibrated on random features of clips of 0.5-4 s (50 frames a second)."""
    torch.manual_seed(1)
    run = tmp_path_factory.mktemp("edge") / "asr_run"
    model = DynamicModel(*with_head(load_backbone("tiny", "wavlm"), task="asr"), selector_budget=True, static_budget=True)
    with torch.no_grad():
        selector = model.strategy("selector").scorer
        selector.prior.normal_()
        selector.corrected[3] = 0
        dim = model.runner.hidden_size
        model.strategy("adaptive").chooser.eval().calibrate(torch.randn(256, 2 * dim), torch.randint(25, 200, (256,)))
    save_model(model, run)
    return run


@pytest.fixture(scope="session")
def tiny_asr_export(tiny_asr_run, tmp_path_factory) -> Path:
    return _exported(tiny_asr_run, tmp_path_factory, "asr_onnx")


@pytest.fixture(scope="session")
def utterance_folder(tmp_path_factory) -> Path:
    """Three utterances of 0.6, 2.3 and 3.7 s (a tone sweep with noise), 16-bit PCM at 16 kHz."""
    folder = tmp_path_factory.mktemp("edge") / "utterances"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, seconds in enumerate((0.6, 2.3, 3.7)):
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t) + 0.05 * rng.standard_normal(len(t))
        write_wav(folder / f"utt_{i}.wav", wave.astype(np.float32))
    return folder
