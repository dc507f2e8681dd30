"""Import a faster-whisper / CTranslate2 Whisper model folder as a Hugging Face Whisper folder.

A CTranslate2 folder holds ``model.bin`` (all weights), ``config.json`` (token ids to suppress,
language ids, alignment heads), ``tokenizer.json`` (HF tokenizers format), ``vocabulary.txt`` and
sometimes ``preprocessor_config.json``. The result is what ``WhisperForConditionalGeneration``
``save_pretrained`` writes, plus the tokenizer, the feature extractor and a generation config, so
``--backbone DIR`` loads it with no hub access.

``model.bin`` layout (CTranslate2 binary versions 2-6; facts from CTranslate2's model loader),
all integers little-endian, strings as uint16 length + bytes ending in NUL:

    uint32 binary_version; string spec_name; uint32 spec_revision; uint32 num_variables
    per variable: string name; uint8 rank; uint32 dims[rank]; uint8 dtype; uint32 num_bytes; bytes
    (binary_version >= 3) uint32 num_aliases; per alias: string alias; string variable_name

Weight names are mapped onto HF's (see ``_hf_name``); anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# dtype ids of CTranslate2's DataType enum
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SUPPORTED_BINARY_VERSIONS = range(2, 7)
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")

# Checkpoints whose sha256 we know (size in bytes -> (sha256, what it is)). A model.bin of a
# pinned size whose hash differs is refused: it is a corrupt or tampered copy.
PINNED = {
    145_217_532: (
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        "Whisper base (multilingual), faster-whisper/CTranslate2 fp16",
    ),
}


class ImportError_(ValueError):
    """A CTranslate2 folder that cannot be imported (message says why)."""


@dataclass
class Ct2Model:
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]


# ---- reading model.bin ---------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ImportError_(f"model.bin is truncated: wanted {n} bytes at offset {self.pos}, file has {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = self.take(self.u16())
        return raw.split(b"\0", 1)[0].decode("utf-8")


def read_model_bin(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin``; raises ``ImportError_`` on an unknown or broken file."""
    r = _Reader(Path(path).read_bytes())
    version = r.u32()
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ImportError_(f"unsupported CTranslate2 binary version {version} (supported: 2-6)")
    spec, revision = r.string(), r.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32()):
        name = r.string()
        shape = [r.u32() for _ in range(r.u8())]
        dtype_id, num_bytes = r.u8(), r.u32()
        if dtype_id not in DTYPES:
            raise ImportError_(f"variable {name}: unsupported dtype id {dtype_id}")
        array = np.frombuffer(r.take(num_bytes), dtype=DTYPES[dtype_id])
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ImportError_(f"variable {name}: {array.size} values for shape {shape}")
        variables[name] = array.reshape(shape)
    if version >= 3:
        for _ in range(r.u32()):
            alias, target = r.string(), r.string()
            if target in variables:
                variables[alias] = variables[target]
    if r.pos != len(r.data):
        raise ImportError_(f"model.bin has {len(r.data) - r.pos} unexpected trailing bytes")
    return Ct2Model(version, spec, revision, variables)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checksum(path: Path, expected: str | None) -> str:
    """sha256 of ``path``; ``ImportError_`` when it differs from ``expected`` or from the pin for its size."""
    digest = sha256_of(path)
    pinned = PINNED.get(path.stat().st_size)
    if expected is None and pinned is not None:
        expected = pinned[0]
    if expected is not None and digest != expected.lower():
        raise ImportError_(f"{path}: sha256 {digest} does not match the expected {expected.lower()}; refusing to import")
    return digest


# ---- names: CTranslate2 -> HF ----------------------------------------------------------------

_LINEAR = {"weight": "weight", "bias": "bias"}
_NORM = {"gamma": "weight", "beta": "bias"}


# Scalar settings CTranslate2 stores next to the weights: the values Whisper has (anything else is a
# different architecture and refused), and the ones that only inform.
EXPECTED_SETTINGS = {"pre_norm": 1, "alibi": 0, "scale_embeddings": 0, "start_from_zero_embedding": 0, "activation": 3}
INFORMATIONAL_SETTINGS = {"num_heads", "alignment_heads", "alignment_layer"}


def check_settings(variables: dict[str, np.ndarray]) -> None:
    """Refuse scalar settings that are unknown or differ from Whisper's (``ImportError_``)."""
    for name, value in variables.items():
        if value.ndim:
            continue
        leaf = name.rsplit("/", 1)[-1]
        if leaf in INFORMATIONAL_SETTINGS:
            continue
        if leaf not in EXPECTED_SETTINGS:
            raise ImportError_(f"unknown setting {name!r} = {value}: not a Whisper layout ldfleet knows")
        if int(value) != EXPECTED_SETTINGS[leaf]:
            raise ImportError_(f"setting {name} = {int(value)}, Whisper has {EXPECTED_SETTINGS[leaf]}: refusing")


def _hf_name(name: str) -> str | list[str] | None:
    """HF parameter name(s) for a CTranslate2 variable; a list when CT2 fuses several (split on dim 0).

    None for the scalar settings (see ``check_settings``)."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in EXPECTED_SETTINGS or leaf in INFORMATIONAL_SETTINGS:
        return None
    fixed = {
        "encoder/conv1/weight": "model.encoder.conv1.weight",
        "encoder/conv1/bias": "model.encoder.conv1.bias",
        "encoder/conv2/weight": "model.encoder.conv2.weight",
        "encoder/conv2/bias": "model.encoder.conv2.bias",
        "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
        "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
        "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
        "decoder/projection/weight": "proj_out.weight",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(encoder|decoder)/layer_norm/(gamma|beta)", name)
    if m:
        return f"model.{m[1]}.layer_norm.{_NORM[m[2]]}"
    m = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(self_attention|attention|ffn)/(\w+)/(\w+)", name)
    if m is None:
        raise ImportError_(f"unknown variable {name!r}: not a Whisper layout ldfleet knows")
    side, i, block, part, leaf = m.groups()
    p = f"model.{side}.layers.{i}"
    attn = "self_attn" if block == "self_attention" else "encoder_attn"
    if part == "layer_norm" and leaf in _NORM:
        norm = {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm", "ffn": "final_layer_norm"}
        return f"{p}.{norm[block]}.{_NORM[leaf]}"
    if leaf not in _LINEAR:
        raise ImportError_(f"unknown variable {name!r}")
    if block == "ffn" and part in ("linear_0", "linear_1"):
        return f"{p}.{'fc1' if part == 'linear_0' else 'fc2'}.{leaf}"
    fused = {
        ("self_attention", "linear_0"): ["q_proj", "k_proj", "v_proj"],
        ("self_attention", "linear_1"): ["out_proj"],
        ("attention", "linear_0"): ["q_proj"],
        ("attention", "linear_1"): ["k_proj", "v_proj"],
        ("attention", "linear_2"): ["out_proj"],
    }.get((block, part))
    if fused is None:
        raise ImportError_(f"unknown variable {name!r}")
    names = [f"{p}.{attn}.{proj}.{leaf}" for proj in fused]
    return names if len(names) > 1 else names[0]


def hf_state_dict(ct2: Ct2Model) -> dict[str, torch.Tensor]:
    """HF ``WhisperForConditionalGeneration`` weights (float32) from CTranslate2 variables.

    Fused q/k/v (or k/v) matrices are split in equal parts along dim 0; HF's k_proj has no bias, so
    the k slice of a fused bias is dropped (it is zero in checkpoints converted from HF).
    """
    check_settings(ct2.variables)
    state: dict[str, torch.Tensor] = {}
    for name, array in ct2.variables.items():
        target = _hf_name(name)
        if target is None:
            continue
        tensor = torch.from_numpy(array.astype(np.float32))
        if isinstance(target, str):
            state[target] = tensor
            continue
        for hf, part in zip(target, tensor.chunk(len(target), dim=0)):
            if not hf.endswith("k_proj.bias"):
                state[hf] = part.contiguous()
    state.setdefault("proj_out.weight", state.get("model.decoder.embed_tokens.weight"))
    return state


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    found = {int(m[1]) for n in variables if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if not found or found != set(range(max(found) + 1)):
        raise ImportError_(f"{side} layers missing or not numbered 0..n-1: {sorted(found)}")
    return max(found) + 1


def whisper_config(ct2: Ct2Model, token_ids: dict[str, int]):
    """A ``WhisperConfig`` whose sizes come from the weights' shapes."""
    from transformers import WhisperConfig

    v = ct2.variables
    need = ("encoder/conv1/weight", "encoder/position_encodings/encodings", "decoder/embeddings/weight",
            "decoder/position_encodings/encodings", "encoder/layer_0/ffn/linear_0/weight")
    missing = [n for n in need if n not in v]
    if missing or not ct2.spec.lower().startswith("whisper"):
        raise ImportError_(f"not a CTranslate2 Whisper model (spec {ct2.spec!r}; missing {missing})")
    d_model = v["encoder/conv1/weight"].shape[0]
    heads = {side: int(np.asarray(v[f"{side}/num_heads"]).reshape(-1)[0]) if f"{side}/num_heads" in v else d_model // 64
             for side in ("encoder", "decoder")}
    return WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        tie_word_embeddings=True,
        **token_ids,
    )


# ---- tokenizer, generation config ---------------------------------------------------------


def _special_ids(tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>")
               if t not in vocab]
    if missing:
        raise ImportError_(f"tokenizer.json lacks Whisper's special tokens {missing}")
    return {t: vocab[t] for t in ("<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>")}


def generation_config(ct2_config: dict, tokenizer, special: dict[str, int], multilingual: bool, max_length: int):
    """Whisper's generation settings from CTranslate2's ``config.json`` and the tokenizer."""
    from transformers import GenerationConfig

    langs = {}
    for i in ct2_config.get("lang_ids", []):
        tok = tokenizer.convert_ids_to_tokens(int(i))
        langs[tok] = int(i)
    return GenerationConfig(
        decoder_start_token_id=special["<|startoftranscript|>"],
        eos_token_id=special["<|endoftext|>"],
        pad_token_id=special["<|endoftext|>"],
        bos_token_id=special["<|endoftext|>"],
        no_timestamps_token_id=special["<|notimestamps|>"],
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids", [])],
        begin_suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids_begin", [])],
        alignment_heads=ct2_config.get("alignment_heads"),
        lang_to_id=langs,
        task_to_id={"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]},
        is_multilingual=multilingual,
        max_length=max_length,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def import_ct2(
    src: Path, out: Path, expected_sha256: str | None = None, log: Callable[[str], None] = print
) -> Path:
    """Convert a CTranslate2 Whisper folder ``src`` into an HF folder ``out``; returns ``out``.

    Raises ``ImportError_`` (a ``ValueError``) for a missing file, a checksum mismatch, an unknown
    binary version, dtype or variable name, or weights that do not fill the HF model exactly.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    src, out = Path(src), Path(out)
    missing = [f for f in REQUIRED_FILES if not (src / f).is_file()]
    if missing:
        raise ImportError_(f"{src} is not a CTranslate2 model folder: missing {', '.join(missing)}")
    digest = check_checksum(src / "model.bin", expected_sha256)
    log(f"model.bin sha256 {digest}")
    ct2 = read_model_bin(src / "model.bin")
    log(f"CTranslate2 binary v{ct2.binary_version}, spec {ct2.spec} rev {ct2.revision}, {len(ct2.variables)} variables")
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    special = _special_ids(tokenizer)
    eot = special["<|endoftext|>"]
    config = whisper_config(ct2, dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                                      decoder_start_token_id=special["<|startoftranscript|>"]))
    model = WhisperForConditionalGeneration(config)
    result = model.load_state_dict(hf_state_dict(ct2), strict=False)
    unexpected = list(result.unexpected_keys)
    missing_keys = [k for k in result.missing_keys if k != "proj_out.weight"]
    if missing_keys or unexpected:
        raise ImportError_(f"weights do not fit Whisper: missing {missing_keys[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    ct2_config = json.loads((src / "config.json").read_text())
    model.generation_config = generation_config(
        ct2_config, tokenizer, special, multilingual=len(ct2_config.get("lang_ids", [])) > 1,
        max_length=config.max_target_positions,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (src / "preprocessor_config.json").is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(src))
    else:
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    extractor.save_pretrained(out)
    (out / "ldfleet_import.json").write_text(json.dumps(
        {"source": str(src), "model_bin_sha256": digest, "binary_version": ct2.binary_version, "spec": ct2.spec,
         "pinned_as": PINNED.get((src / "model.bin").stat().st_size, (None, None))[1]}, indent=2))
    log(f"wrote {out}: {config.encoder_layers}+{config.decoder_layers} layers x {config.d_model}")
    return out
