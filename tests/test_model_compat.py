"""Over the config space of each family: the runner equals HF's forward, or loading is refused clearly.

Property-based (hypothesis) over the architecture fields of WavLM, HuBERT and wav2vec 2.0 configs,
at tiny sizes so one example takes milliseconds. For every generated config EITHER
``LayerRunner(model)(wave, keep=all ones)`` equals ``model(wave).last_hidden_state`` (padded and
unpadded batches) OR building the backbone raises :class:`UnsupportedCheckpoint` naming the field.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldfleet.common.model.backbone import FAMILIES, backbone_from_config
from ldfleet.common.model.compat import FAMILY_TYPES, FOREIGN_FIELDS, UnsupportedCheckpoint
from ldfleet.common.model.runner import LayerRunner

ACTIVATIONS = ("gelu", "relu", "gelu_new", "swish", "tanh")


@st.composite
def encoder_config(draw, family: str) -> dict:
    """Config fields of one family at tiny sizes (HF's own constraints respected)."""
    heads = draw(st.sampled_from((1, 2, 4)))
    hidden = heads * draw(st.sampled_from((4, 8)))
    n_conv = draw(st.integers(2, 3))
    fields = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=draw(st.integers(1, 3)),
        intermediate_size=draw(st.sampled_from((8, 24))),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        feat_extract_norm=draw(st.sampled_from(("group", "layer"))),
        feat_extract_activation=draw(st.sampled_from(ACTIVATIONS)),
        conv_dim=tuple(draw(st.sampled_from((4, 8))) for _ in range(n_conv)),
        conv_kernel=tuple(draw(st.integers(2, 6)) for _ in range(n_conv)),
        conv_stride=tuple(draw(st.integers(2, 4)) for _ in range(n_conv)),
        conv_bias=draw(st.booleans()),
        num_conv_pos_embeddings=draw(st.integers(2, 9)),
        num_conv_pos_embedding_groups=draw(st.sampled_from((1, 2))),
        do_stable_layer_norm=draw(st.booleans()),
        layer_norm_eps=draw(st.sampled_from((1e-5, 1e-6))),
        apply_spec_augment=draw(st.booleans()),
        mask_time_prob=draw(st.sampled_from((0.0, 0.05, 0.3))),
        mask_feature_prob=draw(st.sampled_from((0.0, 0.1))),
        hidden_dropout=draw(st.sampled_from((0.0, 0.1))),
        attention_dropout=draw(st.sampled_from((0.0, 0.1))),
        feat_proj_dropout=draw(st.sampled_from((0.0, 0.1))),
        layerdrop=draw(st.sampled_from((0.0, 0.1, 0.5))),
        add_adapter=draw(st.integers(0, 3)) == 0,
        adapter_stride=draw(st.integers(1, 2)),
        adapter_kernel_size=3,
        num_adapter_layers=draw(st.integers(1, 2)),
        # HF's WavLM has no SDPA attention (it refuses it itself)
        attn_implementation=draw(st.sampled_from(("eager",) if family == "wavlm" else ("eager", "sdpa"))),
    )
    fields["num_feat_extract_layers"] = n_conv
    if family == "hubert":
        fields["feat_proj_layer_norm"] = draw(st.booleans())
        fields["conv_pos_batch_norm"] = draw(st.booleans())
    if family == "wavlm":
        fields["num_buckets"] = draw(st.sampled_from((2, 4, 32, 320)))
        fields["max_bucket_distance"] = draw(st.sampled_from((8, 800)))
    if draw(st.integers(0, 7)) == 0:  # now and then a field of another architecture (mislabelled checkpoint)
        fields[draw(st.sampled_from(sorted(FOREIGN_FIELDS)))] = "relative"
    return fields


def waves(config, padded: bool, seed: int):
    """Two waveforms long enough for the CNN to give >= 6 frames, optionally the second one padded."""
    hop = 1
    for k, s in zip(config.conv_kernel, config.conv_stride):
        hop *= s
    n = hop * 8 + sum(config.conv_kernel) * hop
    gen = torch.Generator().manual_seed(seed)
    wave = torch.randn(2, n, generator=gen)
    mask = torch.ones(2, n, dtype=torch.long)
    if padded:
        mask[1, n * 2 // 3 :] = 0
        wave = wave * mask
    return wave, (mask if padded else None)


def expected_refusals(fields: dict) -> list[str]:
    """The fields a refusal must name, by the rules of HF's code (an oracle written apart from compat.py)."""
    out = [f for f in ("add_adapter", *FOREIGN_FIELDS) if fields.get(f)]
    if "num_buckets" in fields:  # WavLM: max_exact = num_buckets // 4 must be >= 1 and < max_bucket_distance
        buckets, distance = fields["num_buckets"], fields["max_bucket_distance"]
        if buckets // 2 // 2 < 1 or distance <= buckets // 2 // 2:
            out.append("max_bucket_distance")
    return out


DROPOUTS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout")


def check_family(family: str, fields: dict, seed: int, padded: bool, train: bool) -> None:
    if train:  # training mode: HF LayerDrop / SpecAugment must be off, so both agree once dropout is zero
        fields = {**fields, **dict.fromkeys(DROPOUTS, 0.0)}
    config = FAMILIES[family].config_class(**fields)
    expected = expected_refusals(fields)
    torch.manual_seed(seed)
    try:
        model = backbone_from_config(config)
        runner = LayerRunner(model)
    except UnsupportedCheckpoint as exc:
        assert expected, f"refused a config without a known reason: {exc}"
        assert all(f in str(exc) for f in expected), str(exc)
        assert "cannot be run layer by layer" in str(exc)
        return
    assert not expected, f"should have been refused for {expected}"
    wave, mask = waves(config, padded, seed)
    keep = torch.ones(2, runner.num_layers, dtype=torch.bool)
    model.train(train)
    with torch.no_grad():
        # a group-normed CNN runs each padded clip at its own length (test_model_runner checks it against HF
        # on each clip alone): HF's batched forward, given those CNN outputs, must agree on the rest
        per_clip = runner._cnn(wave, mask).transpose(1, 2)
        hook = model.feature_extractor.register_forward_hook(lambda _module, _inputs, _output: per_clip)
        try:
            ref = model(wave, attention_mask=mask).last_hidden_state
        finally:
            hook.remove()
        out = runner(wave, attention_mask=mask, keep=keep)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# The SSL families these rules cover; Whisper's runner is checked against HF in test_model_whisper.py.
@pytest.mark.parametrize("family", sorted(FAMILY_TYPES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**16), padded=st.booleans(), train=st.booleans())
def test_runner_reproduces_hf_or_refuses(family, data, seed, padded, train):
    check_family(family, data.draw(encoder_config(family)), seed, padded, train)


def test_foreign_fields_belong_to_no_supported_family():
    for family in (FAMILIES[name] for name in FAMILY_TYPES):
        assert not set(FOREIGN_FIELDS) & set(family.config_class().to_dict()), family.name
