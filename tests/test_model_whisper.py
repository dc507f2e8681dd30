"""Whisper as a backbone family: the layer runner against HF's WhisperEncoder (tiny config built in code)."""

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.runner import LayerRunner


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_backbone("tiny", "whisper")


def clips(lengths, seed=0):
    """A batch of noise-and-tone clips of the given lengths (samples), zero-padded, with its mask."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    wave = torch.zeros(len(lengths), longest)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    t = torch.arange(longest) / 16000
    for i, n in enumerate(lengths):
        tone = 0.3 * torch.sin(2 * torch.pi * (200 + 100 * i) * t[:n])
        wave[i, :n] = tone + 0.05 * torch.randn(n, generator=gen)
        mask[i, :n] = 1
    return wave, mask


def test_log_mel_matches_hf_feature_extractor(model):
    runner = LayerRunner(model, pad_to_window=True)
    wave, _ = clips([24000])
    extractor = WhisperFeatureExtractor(feature_size=80)
    ref = extractor(wave[0].numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
    mel = runner.log_mel(torch.nn.functional.pad(wave[0], (0, 480000 - 24000)))
    assert mel.shape == ref.shape == (80, 3000)
    assert np.abs(mel.numpy() - ref).max() < 1e-3


@torch.inference_mode()
def test_all_ones_mask_reproduces_hf_encoder_on_30s_window(model):
    runner = LayerRunner(model, pad_to_window=True).eval()
    wave, mask = clips([16000, 40000])
    front = runner.front_end(wave, mask)
    assert front.frame_mask is None and front.hidden.shape[1] == 1500  # the whole window is input
    mel = torch.stack([runner.log_mel(torch.nn.functional.pad(w[: int(m.sum())], (0, 480000 - int(m.sum()))))
                       for w, m in zip(wave, mask)])
    ref = model.model.encoder(mel).last_hidden_state
    keep = torch.ones(2, runner.num_layers, dtype=torch.bool)
    assert torch.equal(runner.run_layers(front, keep), runner.run_layers(front, None))
    assert (runner.run_layers(front, keep) - ref).abs().max() <= 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("pad_to_window", [False, True])
def test_batched_random_masks_equal_one_clip_at_a_time(model, pad_to_window):
    runner = LayerRunner(model, pad_to_window=pad_to_window).eval()
    wave, mask = clips([8000, 16000, 12345], seed=1)
    front = runner.front_end(wave, mask)
    if not pad_to_window:
        assert front.hidden.shape[1] == 50  # 1 s -> 100 mel frames -> 50 encoder frames
        assert front.frame_mask.sum(1).tolist() == [25, 50, 39]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        keep = torch.rand(3, runner.num_layers, generator=gen) > 0.5
        keep[0, 0], keep[1, 0] = False, True
        batched = runner.run_layers(front, keep)
        for i in range(3):
            n = int(mask[i].sum())
            single = runner(wave[i : i + 1, :n], keep=keep[i : i + 1])
            t = single.shape[1]
            assert (batched[i, :t] - single[0]).abs().max() <= 1e-4


@torch.inference_mode()
def test_unpadded_clip_runs_fewer_frames_and_skipping_changes_output(model):
    runner = LayerRunner(model, pad_to_window=False).eval()
    wave, _ = clips([32000])
    front = runner.front_end(wave)
    assert front.frame_mask is None and front.hidden.shape[1] == 100
    full = runner.run_layers(front, None)
    drop = runner.run_layers(front, torch.tensor([[False, True, True, True]]))
    none = runner.run_layers(front, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(none, runner.encoder.layer_norm(front.hidden))
    assert (full - drop).abs().max() > 1e-3


def test_too_long_input_is_refused(model):
    runner = LayerRunner(model, pad_to_window=True)
    with pytest.raises(ValueError, match="30 s"):
        runner.front_end(torch.zeros(1, 480001))


@torch.inference_mode()
def test_skip_maps_fit_each_layer_better_than_skipping_and_keep_the_full_model_exact(model):
    from ldfleet.common.model.skip_maps import fit_skip_maps

    runner = LayerRunner(model, pad_to_window=False).eval()
    wave, mask = clips([16000, 24000, 12000], seed=2)
    front = runner.front_end(wave, mask)
    maps = fit_skip_maps(runner, [front], ridge=1e-6)
    assert maps.weight.shape == (runner.num_layers, runner.hidden_size + 1, runner.hidden_size)
    # least squares on the fitting frames: each stand-in is closer to its layer than passing through
    real = front.frame_mask
    hidden = front.hidden
    ctx = runner._layer_context(hidden, real)
    for i in range(runner.num_layers):
        out = runner._run_layer(i, hidden, *ctx)
        err_map = (maps(i, hidden) - out)[real].pow(2).mean()
        err_skip = (hidden - out)[real].pow(2).mean()
        assert err_map < 0.5 * err_skip, (i, float(err_map), float(err_skip))
        hidden = out
    full = runner.run_layers(front, None)
    runner.skip_maps = maps
    try:
        assert torch.equal(runner.run_layers(front, torch.ones(3, runner.num_layers, dtype=torch.bool)), full)
        none = torch.zeros(3, runner.num_layers, dtype=torch.bool)
        assert (runner.run_layers(front, none) - runner.encoder.layer_norm(front.hidden)).abs().max() > 1e-3
        keep = torch.tensor([[True, False, True, False], [False, True, True, True], [False, False, False, True]])
        batched = runner.run_layers(front, keep)
        for i in range(3):
            n = int(mask[i].sum())
            single = runner(wave[i : i + 1, :n], keep=keep[i : i + 1])
            assert (batched[i, : single.shape[1]] - single[0]).abs().max() <= 1e-4
        gated = runner.run_layers_gated(front, keep.float())
        assert (gated - batched)[real].abs().max() <= 1e-4  # hard gates through the soft path: the same
    finally:
        runner.skip_maps = None


def test_skip_maps_refuse_a_wrong_shape():
    from ldfleet.common.model.skip_maps import SkipMaps

    with pytest.raises(ValueError, match="layers, D \\+ 1, D"):
        SkipMaps(torch.zeros(4, 64, 64))


@torch.inference_mode()
@pytest.mark.parametrize("with_maps", [False, True])
def test_layer_sets_sharing_prefixes_equal_running_each_set(model, with_maps):
    from itertools import combinations

    from ldfleet.common.model.skip_maps import fit_skip_maps

    runner = LayerRunner(model, pad_to_window=False).eval()
    wave, _ = clips([20000], seed=4)
    front = runner.front_end(wave)
    runner.skip_maps = fit_skip_maps(runner, [front], ridge=1e-3) if with_maps else None
    try:
        L = runner.num_layers
        sets = torch.tensor([[j in c for j in range(L)] for k in (1, 2, 3) for c in combinations(range(L), k)])
        shared = runner.run_layer_sets(front, sets, max_rows=3)
        each = runner.run_layers(front.select(torch.zeros(len(sets), dtype=torch.long)), sets)
        assert shared.shape == each.shape and (shared - each).abs().max() <= 1e-5
        assert len({tuple(x.flatten()[:8].tolist()) for x in shared}) == len(sets)  # every set differs
        with pytest.raises(ValueError, match="one clip"):
            runner.run_layer_sets(front.select(torch.zeros(2, dtype=torch.long)), sets)
    finally:
        runner.skip_maps = None
