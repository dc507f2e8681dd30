"""Whisper's own decoder as the speech-recognition head on whatever encoder layers ran.

The head is a :class:`~.heads.TaskHead` (``targets``, ``logits``, ``loss``, ``example_losses``,
``predict``, ``spec``) and :func:`~.heads.head_from_spec` rebuilds it from ``{"type": "whisper_decoder"}``:

* ``predict``: greedy decoding with HF ``generate(encoder_outputs=...)`` and the checkpoint's
  generation config (language and task forced as the head was built with), decoded by the tokenizer;
* ``logits`` / ``loss``: teacher forcing on the prompt ``<|startoftranscript|><|lang|><|transcribe|>
  <|notimestamps|>`` + the transcript's tokens + ``<|endoftext|>``; the loss is the cross-entropy of
  the transcript tokens and the end token (the prompt is given, not scored).

The decoder and its output projection belong to the Whisper backbone; the head only refers to them
(copies of the head share them), so a run folder stores them once, with the backbone. They are
frozen unless ``train_decoder`` is set.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from .heads import IGNORE, Targets, TaskHead


@dataclass
class TokenTargets(Targets):
    """Teacher-forcing inputs ``ids [B, S]`` (prompt + transcript, padded with the end token), labels
    ``[B, S]`` (next token; -100 where nothing is scored) and ``lengths [B]`` = real tokens per row."""

    labels: Tensor | None = None

    def select(self, rows: Tensor) -> "TokenTargets":
        return TokenTargets(ids=self.ids[rows], lengths=self.lengths[rows], labels=self.labels[rows])


class WhisperDecoderHead(TaskHead):
    task: ClassVar[str] = "asr"

    def __init__(self, whisper: nn.Module, tokenizer, language: str | None = "en", train_decoder: bool = False):
        super().__init__()
        object.__setattr__(self, "whisper", whisper)  # shared with the backbone, not a submodule
        self.tokenizer = tokenizer
        self.language = language
        self.train_decoder = train_decoder
        for p in self.decoder_parameters():
            p.requires_grad_(train_decoder)

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        clone._modules = copy.deepcopy(self._modules, memo)
        return clone

    def decoder_parameters(self):
        yield from self.whisper.model.decoder.parameters()

    # ---- targets and teacher forcing ----------------------------------------------------------

    def prompt_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = [tok.convert_tokens_to_ids("<|startoftranscript|>")]
        if self.language:
            ids.append(tok.convert_tokens_to_ids(f"<|{self.language}|>"))
        ids += [tok.convert_tokens_to_ids("<|transcribe|>"), tok.convert_tokens_to_ids("<|notimestamps|>")]
        return ids

    def targets(self, texts: Sequence[str]) -> TokenTargets:
        """Transcripts -> teacher-forcing ids and labels (text as written, with a leading space as
        Whisper writes it; the normaliser applies at scoring)."""
        prompt = self.prompt_ids()
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        rows = [self.tokenizer.encode(" " + t.strip(), add_special_tokens=False) for t in texts]
        width = len(prompt) + max(len(r) for r in rows)
        ids = torch.full((len(rows), width), eot, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        lengths = torch.empty(len(rows), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = prompt + r
            ids[i, : len(seq)] = torch.tensor(seq)
            nxt = r + [eot]
            labels[i, len(prompt) - 1 : len(prompt) - 1 + len(nxt)] = torch.tensor(nxt)
            lengths[i] = len(seq)
        return TokenTargets(ids=ids, lengths=lengths, labels=labels)

    def logits(self, hidden: Tensor, frame_mask: Tensor | None, targets: TokenTargets | None = None) -> Tensor:
        """Teacher-forced decoder logits [B, S, V] for encoder states ``hidden`` [B, T, D].

        Rows with padded frames (``frame_mask``) run one at a time on their real frames (Whisper's
        decoder takes no encoder mask), so a padded batch scores each clip as it scores alone."""
        if targets is None:
            raise ValueError("the Whisper decoder head needs targets for teacher-forced logits")
        if frame_mask is None:
            return self._decode_logits(hidden, targets.ids)
        outs = [self._decode_logits(hidden[i : i + 1, : int(frame_mask[i].sum())], targets.ids[i : i + 1])
                for i in range(hidden.shape[0])]
        return torch.cat(outs)

    def _decode_logits(self, hidden: Tensor, ids: Tensor) -> Tensor:
        out = self.whisper.model.decoder(input_ids=ids, encoder_hidden_states=hidden, use_cache=False)
        return self.whisper.proj_out(out.last_hidden_state)

    def loss_from_logits(self, logits: Tensor, frame_mask: Tensor | None, targets: TokenTargets) -> Tensor:
        return F.cross_entropy(logits.transpose(1, 2), targets.labels, ignore_index=IGNORE)

    def loss(self, hidden: Tensor, frame_mask: Tensor | None, targets: TokenTargets) -> Tensor:
        return self.loss_from_logits(self.logits(hidden, frame_mask, targets), frame_mask, targets)

    def per_example_loss(self, hidden: Tensor, frame_mask: Tensor | None, targets: TokenTargets) -> Tensor:
        """Mean token cross-entropy of each example [B] (for choosing layer sets)."""
        return self.example_losses(self.logits(hidden, frame_mask, targets), frame_mask, targets)

    def example_losses(self, logits: Tensor, frame_mask: Tensor | None, targets: TokenTargets) -> Tensor:
        """Mean token cross-entropy of each example [B] from teacher-forced logits [B, S, V]."""
        ce = F.cross_entropy(logits.transpose(1, 2), targets.labels, ignore_index=IGNORE, reduction="none")
        scored = (targets.labels != IGNORE).to(ce.dtype)
        return (ce * scored).sum(1) / scored.sum(1).clamp(min=1)

    # ---- greedy decoding ---------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, hidden: Tensor, frame_mask: Tensor | None, max_new_tokens: int | None = None) -> list[str]:
        """Greedy transcripts, one per example, from encoder states [B, T, D] (50 frames per second).

        ``max_new_tokens`` defaults to 10 + 6 per second of input, far above speech rates, so a
        decoder caught in a repetition loop stops early instead of running to 448 tokens."""
        if frame_mask is None:
            return self._generate(hidden, max_new_tokens)
        return [self._generate(hidden[i : i + 1, : int(frame_mask[i].sum())], max_new_tokens)[0]
                for i in range(hidden.shape[0])]

    def _generate(self, hidden: Tensor, max_new_tokens: int | None) -> list[str]:
        if max_new_tokens is None:
            max_new_tokens = 10 + int(6 * hidden.shape[1] / 50)
        max_new_tokens = min(max_new_tokens, self.whisper.config.max_target_positions - len(self.prompt_ids()))
        forced = {}
        if getattr(self.whisper.generation_config, "is_multilingual", False):
            forced = {"language": self.language, "task": "transcribe"}
        ids = self.whisper.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, **forced,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def decode(self, logits: Tensor, frame_mask: Tensor | None) -> list[str]:
        raise NotImplementedError("the Whisper decoder head decodes from encoder states: use predict(hidden, frame_mask)")

    def spec(self) -> dict:
        return {"type": "whisper_decoder", "language": self.language, "train_decoder": self.train_decoder}


def whisper_head_from_spec(spec: dict, whisper: nn.Module | None) -> WhisperDecoderHead:
    """The head a run folder's spec describes, on ``whisper`` (a loaded WhisperForConditionalGeneration);
    the tokenizer is read from the folder the model came from. ValueError when either is missing."""
    from transformers import WhisperTokenizerFast

    folder = getattr(getattr(whisper, "config", None), "_name_or_path", "") if whisper is not None else ""
    if not hasattr(whisper, "generate") or not folder:
        raise ValueError("a whisper_decoder head needs the Whisper model it decodes with, loaded from a folder with its tokenizer")
    try:
        tokenizer = WhisperTokenizerFast.from_pretrained(folder)
    except OSError as exc:
        raise ValueError(f"no Whisper tokenizer in {folder}: {exc}") from exc
    return WhisperDecoderHead(whisper, tokenizer, spec.get("language", "en"), bool(spec.get("train_decoder", False)))
