"""`ldfleet model import`: a CTranslate2 Whisper folder written by the test becomes an HF folder."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from whisper_fixtures import WORDS, ct2_variables, tiny_whisper, write_ct2

from ldfleet.cli import app
from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.ct2_import import ImportError_, import_ct2, read_model_bin
from ldfleet.common.model.runner import LayerRunner



@pytest.fixture(scope="module")
def source():
    return tiny_whisper()


def test_round_trip_gives_the_same_weights_and_encoder_output(source, tmp_path):
    write_ct2(tmp_path / "ct2", ct2_variables(source))
    out = import_ct2(tmp_path / "ct2", tmp_path / "hf", log=lambda m: None)
    loaded = load_backbone(str(out), "whisper")
    half = {k: v.half().float() for k, v in source.state_dict().items()}
    got = loaded.state_dict()
    assert set(got) == set(half)
    for k in half:
        assert torch.equal(got[k], half[k]), k
    assert loaded.config.encoder_layers == 2 and loaded.config.encoder_attention_heads == 4
    gen = loaded.generation_config
    assert gen.lang_to_id == {"<|en|>": len(WORDS) + 2, "<|nl|>": len(WORDS) + 3}
    assert gen.decoder_start_token_id == len(WORDS) + 1
    wave = torch.randn(1, 16000)
    with torch.inference_mode():
        a = LayerRunner(loaded, pad_to_window=False)(wave)
        source.load_state_dict(half)
        b = LayerRunner(source, pad_to_window=False)(wave)
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_variable_checksum_and_truncation_are_refused(source, tmp_path):
    variables = ct2_variables(source)
    write_ct2(tmp_path / "odd", {**variables, "encoder/layer_0/adapter/linear_0/weight": np.zeros((2, 2), np.float16)})
    with pytest.raises(ImportError_, match="unknown variable"):
        import_ct2(tmp_path / "odd", tmp_path / "o1", log=lambda m: None)
    write_ct2(tmp_path / "relu", {**variables, "decoder/activation": np.array(0, np.int8)})
    with pytest.raises(ImportError_, match="activation"):
        import_ct2(tmp_path / "relu", tmp_path / "o2", log=lambda m: None)
    write_ct2(tmp_path / "ok", variables)
    with pytest.raises(ImportError_, match="sha256"):
        import_ct2(tmp_path / "ok", tmp_path / "o3", expected_sha256="0" * 64, log=lambda m: None)
    data = (tmp_path / "ok" / "model.bin").read_bytes()
    (tmp_path / "ok" / "model.bin").write_bytes(data[:-100])
    with pytest.raises(ImportError_, match="truncated"):
        read_model_bin(tmp_path / "ok" / "model.bin")


def test_cli_refuses_a_folder_without_model_bin(tmp_path):
    (tmp_path / "src").mkdir()
    result = CliRunner().invoke(app, ["model", "import", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "model.bin" in result.output
