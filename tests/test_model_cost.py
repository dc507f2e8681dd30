"""Analytic cost, budgets, checkpoints and latency profiles."""

import math
from types import SimpleNamespace

import pytest
import torch

from ldfleet.common.budget import expected_latency_ms, layers_for_keep, layers_for_latency
from ldfleet.common.model.backbone import build_config, load_backbone
from ldfleet.common.model.checkpoint import load_model, save_model
from ldfleet.common.model.cost import cost_of, frames_for, layer_macs
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head
from ldfleet.common.model.profiling import measure_latency, tail_ratios


def test_frames_match_the_real_model():
    cfg = build_config("wavlm", "tiny")
    model = load_backbone("tiny")
    with torch.inference_mode():
        for samples in (16000, 80000, 12345):
            assert model(torch.randn(1, samples)).last_hidden_state.shape[1] == frames_for(cfg, samples)


def test_base_config_is_the_real_base_size_and_selector_under_one_percent():
    model = DynamicModel(*with_head(load_backbone("base", "hubert")))
    cfg = model.runner.backbone.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.layerdrop) == (768, 12, 0.0)
    for seconds in (1.0, 5.0):
        cost = cost_of(model, seconds)
        assert cost.selector <= 0.01 * cost.full
        # known figure: a base encoder layer on 1 s (49 frames) is ~0.35 GMACs
        assert cost.layer == layer_macs(cfg, cost.frames)
    assert 0.3e9 < cost_of(model, 1.0).layer < 0.4e9


def test_cost_of_mask_is_linear_in_layers_run():
    model = DynamicModel(*with_head(load_backbone("tiny")))
    cost = cost_of(model)
    keep = torch.zeros(4, model.num_layers, dtype=torch.bool)
    keep[:, :2] = True
    keep[:2, 2:4] = True  # two inputs run 4 layers, two run 2: mean 3
    assert cost.of_mask(keep, with_selector=True) == pytest.approx(cost.front_end + 3 * cost.layer + cost.head + cost.selector)
    assert cost.total(model.num_layers, False) == cost.full


def test_budget_conversions():
    assert [layers_for_keep(r, 12) for r in (0.25, 0.5, 0.75, 1.0)] == [3, 6, 9, 12]
    assert layers_for_keep(0.01, 12) == 1
    for bad in (0.0, -0.5, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError):
            layers_for_keep(bad, 12)
    layer_ms = [5.0, 10.0, 5.0, 5.0]
    # front end 5 ms, then the slowest layers first (pessimistic: the selector may pick them)
    assert layers_for_latency(19.0, 5.0, layer_ms) == 1  # 5 + 10 fits, + 5 more does not
    assert layers_for_latency(20.0, 5.0, layer_ms) == 2  # 5 + 10 + 5 fits exactly
    assert layers_for_latency(25.0, 5.0, layer_ms) == 3
    assert layers_for_latency(1000.0, 5.0, layer_ms) == 4
    assert layers_for_latency(1.0, 5.0, layer_ms) == 1  # never below one layer
    assert expected_latency_ms(2, 5.0, layer_ms) == 20.0
    with pytest.raises(ValueError):
        layers_for_latency(-1, 5.0, layer_ms)
    with pytest.raises(ValueError):
        layers_for_latency(10, 5.0, [])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = DynamicModel(*with_head(load_backbone("tiny", "hubert"), labels=["a", "b", "c", "d", "e"])).eval()
    torch.nn.init.normal_(model.strategies["static"].scorer.scores)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    wave = torch.randn(2, 16000)
    with torch.inference_mode():
        for strategy in ("full", "static", "selector"):
            a, b = model(wave, strategy=strategy, keep=0.5), loaded(wave, strategy=strategy, keep=0.5)
            assert torch.equal(a.keep, b.keep) and torch.allclose(a.logits, b.logits)


def test_loading_a_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="ldfleet train"):
        load_model(tmp_path / "nope")


def test_latency_profile_measures_every_layer():
    profile = measure_latency("wav2vec2", "tiny", seconds=0.5, repeats=2)
    assert profile.num_layers == 8 and len(profile.layer_ms) == 8
    assert profile.front_end_ms > 0 and all(ms > 0 for ms in profile.layer_ms)
    assert profile.full_ms == pytest.approx(profile.front_end_ms + sum(profile.layer_ms))
    assert 1.0 <= profile.ratio_p90 <= profile.ratio_p99 <= 100.0


def test_tail_ratios_are_quantiles_over_the_median():
    r90, r99 = tail_ratios([float(x) for x in range(1, 101)])  # median 50.5, p90 90.1, p99 99.01
    assert r90 == pytest.approx(90.1 / 50.5) and r99 == pytest.approx(99.01 / 50.5)
    assert tail_ratios([5.0] * 20) == (1.0, 1.0)
    assert tail_ratios([1.0] * 90 + [1000.0] * 10)[1] == 100.0  # capped at what a profile may carry


def test_a_measured_profile_carries_its_tail_and_a_p99_target_keeps_fewer_layers():
    from ldfleet.client.profile import measure_profile
    from ldfleet.common.policy import k_for_budget

    prof = measure_profile("dev-1", "rpi4", family="wavlm", size="tiny", seconds=0.5, repeats=2)
    assert prof.latency_ratio_p90 is not None and prof.latency_ratio_p99 >= prof.latency_ratio_p90 >= 1.0
    # a profile with a known tail: a p99 target must budget for 2x the median
    slow_tail = prof.model_copy(update={"front_end_ms": 1.0, "layer_ms": [1.0] * 8, "latency_ratio_p90": 1.5, "latency_ratio_p99": 2.0})
    k_median, _ = k_for_budget(slow_tail, latency_ms=9.0)
    k_p99, _ = k_for_budget(slow_tail, latency_ms=9.0, percentile=99)
    assert (k_median, k_p99) == (8, 3)


def test_whisper_cost_follows_the_runner_padded_or_not():
    backbone = load_backbone("tiny", "whisper")
    model = DynamicModel(*with_head(backbone))  # a keyword head on the Whisper encoder
    for pad in (True, False):
        model.runner.pad_to_window = pad
        for seconds in (1.0, 2.5):
            with torch.inference_mode():
                front = model.front_end(torch.randn(1, int(seconds * 16000)))
            cost = cost_of(model, seconds)
            assert cost.frames == front.hidden.shape[1], (pad, seconds)
            assert cost.layer == layer_macs(backbone.config, cost.frames)
            assert 0 < cost.selector < cost.layer
    model.runner.pad_to_window = True  # every clip costs the 30 s window
    assert cost_of(model, 1.0).full == cost_of(model, 2.5).full
    model.runner.pad_to_window = False
    assert cost_of(model, 1.0).full < cost_of(model, 2.5).full
    # Whisper base on the 30 s window (1500 frames, d 512, FFN 2048): 7.0 GMACs per encoder layer
    base = SimpleNamespace(model_type="whisper", hidden_size=512, encoder_ffn_dim=2048)
    assert layer_macs(base, 1500) == 7_022_592_000
