"""A tiny Whisper in CTranslate2's format, written by the tests (the layout ct2_import documents)."""

import json
import struct

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import WhisperConfig, WhisperForConditionalGeneration

SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|nl|>", "<|translate|>", "<|transcribe|>",
           "<|nocaptions|>", "<|notimestamps|>"]
WORDS = ["hello", "world", "press", "one", "two"]


# ---- a tiny CTranslate2 writer (the layout the importer documents) --------------------------


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray) -> bytes:
    dtype_id = {np.dtype(np.float16): 4, np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2}[array.dtype]
    data = array.tobytes()
    return (_string(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
            + struct.pack("<BI", dtype_id, len(data)) + data)


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """HF weights in CTranslate2's Whisper names (q/k/v fused, k bias zero), fp16, + settings."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    out = {}

    def lin(dst, *srcs, zero_bias=()):
        out[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        out[f"{dst}/bias"] = np.concatenate([np.zeros(sd[f"{s}.weight"].shape[0], np.float16) if s in zero_bias
                                             else sd[f"{s}.bias"] for s in srcs])

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            p, c = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{c}/self_attention/layer_norm", f"{p}.self_attn_layer_norm")
            lin(f"{c}/self_attention/linear_0", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj",
                zero_bias=(f"{p}.self_attn.k_proj",))
            lin(f"{c}/self_attention/linear_1", f"{p}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{c}/attention/layer_norm", f"{p}.encoder_attn_layer_norm")
                lin(f"{c}/attention/linear_0", f"{p}.encoder_attn.q_proj")
                lin(f"{c}/attention/linear_1", f"{p}.encoder_attn.k_proj", f"{p}.encoder_attn.v_proj",
                    zero_bias=(f"{p}.encoder_attn.k_proj",))
                lin(f"{c}/attention/linear_2", f"{p}.encoder_attn.out_proj")
            norm(f"{c}/ffn/layer_norm", f"{p}.final_layer_norm")
            lin(f"{c}/ffn/linear_0", f"{p}.fc1")
            lin(f"{c}/ffn/linear_1", f"{p}.fc2")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        out[f"{side}/num_heads"] = np.array(4, np.int16)
        out[f"{side}/pre_norm"] = np.array(1, np.int8)
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"], out[f"encoder/{conv}/bias"] = sd[f"model.encoder.{conv}.weight"], sd[f"model.encoder.{conv}.bias"]
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/activation"] = np.array(3, np.int8)
    out["decoder/scale_embeddings"] = np.array(0, np.int8)
    return out


def write_ct2(folder, variables, aliases=(("decoder/projection/weight", "decoder/embeddings/weight"),)):
    folder.mkdir(parents=True, exist_ok=True)
    body = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    body += b"".join(_variable(n, a) for n, a in variables.items())
    body += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    (folder / "model.bin").write_bytes(body)
    vocab = {t: i for i, t in enumerate(WORDS + SPECIAL)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({
        "lang_ids": [vocab["<|en|>"], vocab["<|nl|>"]], "suppress_ids": [vocab["<|nocaptions|>"]],
        "suppress_ids_begin": [vocab["<|endoftext|>"]], "alignment_heads": [[0, 1]]}))
    (folder / "vocabulary.txt").write_text("\n".join(vocab))


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """2 + 2 layers x 32, a 13-token vocabulary (the words above + Whisper's special tokens)."""
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=len(WORDS) + len(SPECIAL), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
                        pad_token_id=len(WORDS), bos_token_id=len(WORDS), eos_token_id=len(WORDS),
                        decoder_start_token_id=len(WORDS) + 1)
    return WhisperForConditionalGeneration(cfg).eval()
