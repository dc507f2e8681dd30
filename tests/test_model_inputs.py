"""A checkpoint's own input spec (preprocessor_config.json) is honoured, kept with the run, or refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2FeatureExtractor

from ldfleet.common.model.backbone import build_config, load_backbone
from ldfleet.common.model.checkpoint import MODEL_JSON, load_model, save_model
from ldfleet.common.model.compat import UnsupportedCheckpoint
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head
from ldfleet.common.model.inputs import CONFIG_KEY, InputSpec

FAMILY = {"wavlm": "WavLMModel", "hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}


def checkpoint(tmp_path, family="wavlm", extractor: dict | None = None, dtype=torch.float32, **config):
    """A real HF checkpoint folder (config.json + model.safetensors [+ preprocessor_config.json])."""
    from ldfleet.common.model.backbone import FAMILIES

    cfg = build_config(family, "tiny")
    cfg.num_hidden_layers = 2
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = FAMILIES[family].model_class(cfg).to(dtype)
    folder = tmp_path / f"ckpt-{family}"
    model.save_pretrained(folder)
    if extractor is not None:
        Wav2Vec2FeatureExtractor(**extractor).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_do_normalize_false_means_the_front_end_sees_raw_samples(tmp_path, family):
    folder = checkpoint(tmp_path, family, extractor={"do_normalize": False})
    model = DynamicModel(*with_head(load_backbone(str(folder)), labels=["a", "b", "c"])).eval()
    assert model.input_spec.do_normalize is False and "preprocessor_config.json" in model.input_spec.source
    wave = 0.05 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.front_end(wave).hidden
        raw = model.runner.front_end(wave).hidden
        louder = model.front_end(4 * wave).hidden
    assert torch.equal(ours, raw)  # no normalisation in between
    assert (louder - ours).abs().max() > 1e-3  # so the input level reaches the model, as in its training


def test_do_normalize_true_normalises_so_level_does_not_matter(tmp_path):
    model = DynamicModel(*with_head(load_backbone(str(checkpoint(tmp_path, extractor={"do_normalize": True}))), labels=["a", "b", "c"])).eval()
    wave = 0.05 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.front_end(4 * wave).hidden - model.front_end(wave).hidden).abs().max() < 1e-4


def test_the_spec_is_saved_with_the_run_and_restored(tmp_path):
    model = DynamicModel(*with_head(load_backbone(str(checkpoint(tmp_path, extractor={"do_normalize": False}))), labels=["a", "b", "c"])).eval()
    save_model(model, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / MODEL_JSON).read_text())
    assert meta["backbone_config"][CONFIG_KEY]["do_normalize"] is False
    loaded = load_model(tmp_path / "run")
    assert loaded.input_spec.do_normalize is False
    wave = 0.05 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.front_end(wave).hidden, model.front_end(wave).hidden)


def test_in_code_sizes_and_old_runs_normalise_as_before(tmp_path):
    from ldfleet.common.model.backbone import backbone_from_config

    model = DynamicModel(*with_head(load_backbone("tiny"), labels=["a", "b", "c"]))
    assert model.input_spec == InputSpec()
    save_model(model, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / MODEL_JSON).read_text())
    assert CONFIG_KEY not in meta["backbone_config"]  # nothing written for in-code sizes: old runs look the same
    assert DynamicModel(*with_head(backbone_from_config(meta["backbone_config"]), labels=["a", "b", "c"])).input_spec.do_normalize is True


def test_a_checkpoint_without_preprocessor_config_gets_hf_defaults_and_says_so(tmp_path):
    backbone = load_backbone(str(checkpoint(tmp_path)))
    spec = DynamicModel(*with_head(backbone, labels=["a", "b", "c"])).input_spec
    assert spec.do_normalize is True and spec.sampling_rate == 16000 and "no preprocessor_config.json" in spec.source


@pytest.mark.parametrize("extractor, field", [
    ({"sampling_rate": 8000}, "sampling_rate=8000"),
    ({"feature_size": 80}, "feature_size=80"),
    ({"padding_value": -1.0}, "padding_value=-1.0"),
])
def test_inputs_ldfleet_cannot_give_are_refused_at_load(tmp_path, extractor, field):
    with pytest.raises(UnsupportedCheckpoint, match=field):
        load_backbone(str(checkpoint(tmp_path, extractor=extractor)))


def test_architectures_the_runner_cannot_reproduce_are_refused_before_weights_load(tmp_path):
    with pytest.raises(UnsupportedCheckpoint, match="add_adapter=True"):
        load_backbone(str(checkpoint(tmp_path, "wav2vec2", add_adapter=True)))
    folder = checkpoint(tmp_path, "wavlm")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "position_embeddings_type": "rotary"}))
    with pytest.raises(UnsupportedCheckpoint, match="position_embeddings_type='rotary' is a wav2vec2-conformer field"):
        load_backbone(str(folder))


def test_missing_encoder_weights_are_refused_not_filled_randomly(tmp_path):
    folder = checkpoint(tmp_path, "hubert")
    weights = load_file(str(folder / "model.safetensors"))
    dropped = sorted(k for k in weights if k.startswith("encoder.layers.1."))
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpoint, match=f"{len(dropped)} encoder weights missing"):
        load_backbone(str(folder))


def test_a_float16_checkpoint_loads_as_float32_and_runs(tmp_path):
    model = DynamicModel(*with_head(load_backbone(str(checkpoint(tmp_path, dtype=torch.float16))), labels=["a", "b", "c"])).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 16000), strategy="full").logits).all()


def test_train_refuses_an_unsupported_checkpoint_with_a_clear_error(tmp_path):
    import numpy as np
    import soundfile as sf
    from typer.testing import CliRunner

    from ldfleet.cli import app

    data = tmp_path / "data"
    for word, spk in (("yes", "aa11"), ("no", "bb22"), ("up", "cc33")):
        (data / word).mkdir(parents=True)
        sf.write(data / word / f"{spk}_nohash_0.wav", np.full(8000, 0.1, np.float32), 16000)
    folder = checkpoint(tmp_path, "wavlm", extractor={"sampling_rate": 22050})
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--backbone", str(folder), "--epochs", "0", "--strategy-epochs", "0"])
    said = result.output.replace("\n", "")
    assert result.exit_code != 0 and "cannot be run layer by layer" in said and "sampling_rate=22050" in said
