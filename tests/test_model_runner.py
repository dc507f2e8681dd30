"""The layer runner against the Hugging Face forward, for the three SSL encoder families
(Whisper: tests/test_model_whisper.py)."""

import pytest
import torch

from ldfleet.common.model.backbone import FAMILIES, backbone_from_config, build_config
from ldfleet.common.model.runner import LayerRunner

FAMILY_NAMES = sorted(f for f in FAMILIES if f != "whisper")


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def runner(request):
    torch.manual_seed(0)
    return LayerRunner(backbone_from_config(build_config(request.param, "tiny"))).eval()


def padded_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    wave = torch.randn(3, 16000, generator=gen)
    mask = torch.ones(3, 16000, dtype=torch.long)
    mask[1, 9000:] = 0
    mask[2, 12500:] = 0
    return wave * mask, mask


@torch.inference_mode()
def test_all_ones_mask_reproduces_hf_without_padding(runner):
    wave = torch.randn(2, 16000)
    ref = runner.backbone(wave).last_hidden_state
    keep = torch.ones(2, runner.num_layers, dtype=torch.bool)
    assert (runner(wave, keep=keep) - ref).abs().max() <= 1e-5


@torch.inference_mode()
def test_each_padded_clip_gets_what_hf_gives_it_alone(runner):
    # the tiny configs' CNN is group-normed (over the whole input, padding included): a clip padded in
    # a batch must still get the output it has alone, as a device runs it
    assert runner.backbone.config.feat_extract_norm == "group"
    wave, mask = padded_batch()
    keep = torch.ones(3, runner.num_layers, dtype=torch.bool)
    batched = runner(wave, attention_mask=mask, keep=keep)
    frames = runner.front_end(wave, mask).frame_mask
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = runner.backbone(wave[i : i + 1, :n]).last_hidden_state[0]
        assert frames[i].sum() == alone.shape[0]
        assert (batched[i, frames[i]] - alone).abs().max() <= 1e-4
    padded_in_hf = runner.backbone(wave, attention_mask=mask).last_hidden_state  # what batching used to give
    assert (batched[2, frames[2]] - padded_in_hf[2, frames[2]]).abs().max() > 1e-3
    runner.train()  # training keeps the batched CNN (twice as fast per epoch)
    try:
        assert torch.equal(runner._cnn(wave, mask), runner.backbone.feature_extractor(wave).transpose(1, 2))
    finally:
        runner.eval()


@torch.inference_mode()
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_normed_cnn_with_padding_reproduces_hf_batched(family):
    # a layer-normed CNN (per frame) does not see the padding: the batch runs as HF runs it
    torch.manual_seed(0)
    runner = LayerRunner(backbone_from_config(build_config(family, "tiny").__class__(
        **{**build_config(family, "tiny").to_dict(), "feat_extract_norm": "layer"}))).eval()
    wave, mask = padded_batch()
    ref = runner.backbone(wave, attention_mask=mask).last_hidden_state
    keep = torch.ones(3, runner.num_layers, dtype=torch.bool)
    assert (runner(wave, attention_mask=mask, keep=keep) - ref).abs().max() <= 1e-5


@torch.inference_mode()
def test_batched_random_masks_equal_one_example_at_a_time(runner):
    wave, mask = padded_batch(1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        keep = torch.rand(3, runner.num_layers, generator=gen) > 0.5
        keep[0, 0] = False  # layer 0 skipped for one example (WavLM keeps its position bias there)
        keep[1, 0] = True
        batched = runner(wave, attention_mask=mask, keep=keep)
        frames = runner.front_end(wave, mask).frame_mask
        for i in range(3):
            single = runner(wave[i : i + 1], attention_mask=mask[i : i + 1], keep=keep[i : i + 1])
            real = frames[i]
            assert (batched[i, real] - single[0, real]).abs().max() <= 1e-4


@torch.inference_mode()
def test_skipping_layers_changes_output_and_empty_mask_is_identity(runner):
    wave = torch.randn(2, 16000)
    front = runner.front_end(wave)
    full = runner.run_layers(front, None)
    none = runner.run_layers(front, torch.zeros(2, runner.num_layers, dtype=torch.bool))
    some = runner.run_layers(front, torch.tensor([[True] + [False] * (runner.num_layers - 1)] * 2))
    if not runner.stable_layer_norm:
        assert torch.equal(none, front.hidden)
    assert (full - some).abs().max() > 1e-3
    assert (some - none).abs().max() > 1e-3


def test_gated_run_equals_hard_mask_and_passes_gradients(runner):
    runner.eval()
    wave = torch.randn(2, 16000)
    front = runner.front_end(wave)
    keep = torch.tensor([[True, False] * (runner.num_layers // 2), [False, True] * (runner.num_layers // 2)])
    gates = keep.float().requires_grad_(True)
    gated = runner.run_layers_gated(front, gates)
    with torch.no_grad():
        hard = runner.run_layers(front, keep)
    assert (gated - hard).abs().max() <= 1e-4
    gated.pow(2).mean().backward()
    assert gates.grad is not None and (gates.grad.abs() > 0).all()
