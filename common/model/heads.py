"""Task heads on top of the encoder's last hidden state.

A head maps hidden states ``[B, T, D]`` (plus the frame mask ``[B, T]``, True = real frame) to its
task's outputs and owns the task's loss and decoding, so training, evaluation and the runner do not
care which task they serve:

* :class:`ClassificationHead` — utterance classification (keyword spotting) over any label set;
* :class:`CTCHead` — speech recognition with connectionist temporal classification over characters
  or, for closed vocabularies, whole words (Graves et al., 2006), greedy decoding;
* ``WhisperDecoderHead`` (:mod:`.whisper_head`) — Whisper's own decoder, greedy ``generate``; it
  overrides ``predict`` (it decodes from encoder states, not from logits).

``spec()`` is the JSON a run folder stores; :func:`head_from_spec` rebuilds the same head.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..metrics import normalize_text
from .selector import masked_mean_std

IGNORE = -100  # padding in token targets (PyTorch's ignore_index convention)


@dataclass
class Targets:
    """What a loss compares with: class ids ``[B]``, or token ids ``[B, S]`` (pad -100) + ``lengths [B]``."""

    ids: Tensor
    lengths: Tensor | None = None

    def select(self, rows: Tensor) -> Targets:
        return Targets(self.ids[rows], None if self.lengths is None else self.lengths[rows])


class TaskHead(nn.Module):
    """Interface of every head; see the module docstring."""

    task: ClassVar[str] = ""

    def targets(self, texts: Sequence[str]) -> Targets:  # pragma: no cover - interface
        raise NotImplementedError

    def logits(self, hidden: Tensor, frame_mask: Tensor | None, targets: Targets | None = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def loss_from_logits(self, logits: Tensor, frame_mask: Tensor | None, targets: Targets) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def decode(self, logits: Tensor, frame_mask: Tensor | None) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def spec(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def example_losses(self, logits: Tensor, frame_mask: Tensor | None, targets: Targets) -> Tensor:
        """Loss of each example ``[B]`` (to rank layer sets per input)."""
        raise NotImplementedError  # pragma: no cover - interface

    def loss(self, hidden: Tensor, frame_mask: Tensor | None, targets: Targets) -> Tensor:
        """Scalar training loss."""
        return self.loss_from_logits(self.logits(hidden, frame_mask, targets), frame_mask, targets)

    def predict(self, hidden: Tensor, frame_mask: Tensor | None) -> list[str]:
        """Label names (kws) or transcripts (asr), one per example."""
        return self.decode(self.logits(hidden, frame_mask), frame_mask)

    def confidence(self, logits: Tensor, frame_mask: Tensor | None) -> Tensor:
        """How sure the head is of each example, ``[B]`` in (0, 1]: the top posterior of logits ``[B, C]``,
        or its mean over real frames (``frame_mask`` ``[B, T]``) of per-frame logits ``[B, T, V]``."""
        top = logits.softmax(-1).amax(-1)
        if top.dim() == 1:
            return top
        if frame_mask is None:
            return top.mean(1)
        m = frame_mask[:, : top.shape[1]].to(top.dtype)
        return (top * m).sum(1) / m.sum(1).clamp(min=1)

    def distill_loss(self, logits: Tensor, teacher: Tensor, frame_mask: Tensor | None) -> Tensor:
        """KL(teacher || student) of the output distributions, averaged over real frames/examples."""
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
        if kl.dim() == 2 and frame_mask is not None:
            return (kl * frame_mask).sum() / frame_mask.sum().clamp(min=1)
        return kl.mean()


class ClassificationHead(TaskHead):
    """Mean-pooled hidden states -> LayerNorm -> Linear over ``labels`` (keyword spotting)."""

    task = "kws"

    def __init__(self, hidden_size: int, labels: Sequence[str], dropout: float = 0.1):
        super().__init__()
        self.labels = list(labels)
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"a classification head needs >= 2 distinct labels, got {self.labels}")
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def targets(self, texts: Sequence[str]) -> Targets:
        unknown = sorted({t for t in texts if t not in self.index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the head's label set {self.labels}")
        return Targets(torch.tensor([self.index[t] for t in texts], dtype=torch.long))

    def logits(self, hidden, frame_mask, targets=None):
        pooled, _ = masked_mean_std(hidden, frame_mask)
        return self.proj(self.dropout(self.norm(pooled)))

    def loss_from_logits(self, logits, frame_mask, targets):
        return F.cross_entropy(logits, targets.ids, label_smoothing=0.05)

    def example_losses(self, logits, frame_mask, targets):
        return F.cross_entropy(logits, targets.ids, reduction="none")

    def decode(self, logits, frame_mask):
        return [self.labels[i] for i in logits.argmax(-1).tolist()]

    def spec(self) -> dict:
        return {"type": "classification", "labels": self.labels}


class CharVocab:
    """Characters of normalised text; id 0 is the CTC blank and ``|`` stands for the space."""

    unit: ClassVar[str] = "char"
    BLANK = "<blank>"
    SPACE = "|"
    DEFAULT = tuple("abcdefghijklmnopqrstuvwxyz'")

    def __init__(self, chars: Sequence[str] = DEFAULT):
        symbols = [c for c in dict.fromkeys(chars) if c not in (" ", self.SPACE)]
        self.tokens = [self.BLANK, self.SPACE, *symbols]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> CharVocab:
        """The default letters plus any other character the (normalised) texts use, e.g. digits."""
        extra = sorted({c for t in texts for c in normalize_text(t)} - set(cls.DEFAULT) - {" "})
        return cls((*cls.DEFAULT, *extra))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of the normalised text; characters outside the vocabulary are dropped."""
        return [self.index[c] for c in normalize_text(text).replace(" ", self.SPACE) if c in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i != 0).replace(self.SPACE, " ").strip()


class WordVocab:
    """Whole words of normalised text; id 0 is the CTC blank, id 1 (``<unk>``) any other word.

    For closed vocabularies (command sets, digit strings): one output per word, so the model
    learns no spelling and a word is either right or wrong, as in isolated-word recognisers.
    A word outside the vocabulary cannot be recognised (it decodes as ``<unk>``): open-vocabulary
    speech needs :class:`CharVocab`. Not the default: trained from scratch on the synthetic phrase
    corpus (38 words), word units stayed on the CTC blank plateau (loss at the uniform level) for 7
    epochs, with one divergence, where characters left it after 3 (the outputs are sparser: ~4
    labels per utterance instead of ~25, so emitting only blanks is nearly as good for longer)."""

    unit: ClassVar[str] = "word"
    BLANK = "<blank>"
    UNK = "<unk>"

    def __init__(self, words: Sequence[str]):
        words = [w for w in dict.fromkeys(words) if w not in (self.BLANK, self.UNK)]
        if not words or any(not w or " " in w for w in words):
            raise ValueError(f"a word vocabulary needs non-empty words without spaces, got {list(words)[:10]}")
        self.tokens = [self.BLANK, self.UNK, *words]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> WordVocab:
        return cls(sorted({w for t in texts for w in normalize_text(t).split()}))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 1) for w in normalize_text(text).split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if i != 0)


#: CTC token units by name (``TrainConfig.tokens``, a head's spec).
VOCABS: dict[str, type[CharVocab] | type[WordVocab]] = {"char": CharVocab, "word": WordVocab}


def _vocab_class(unit: str) -> type[CharVocab] | type[WordVocab]:
    if unit not in VOCABS:
        raise ValueError(f"unknown token unit {unit!r} (char or word)")
    return VOCABS[unit]


def choose_vocab(texts: Sequence[str], unit: str = "char") -> CharVocab | WordVocab:
    """The CTC vocabulary of a training set in ``unit`` (``char`` or ``word``); ValueError otherwise."""
    return _vocab_class(unit).from_texts(texts)


def vocab_from_spec(unit: str, tokens: Sequence[str]) -> CharVocab | WordVocab:
    """A vocabulary as stored (``unit`` and the tokens after blank and space/unk); ValueError for another unit."""
    return _vocab_class(unit)(tokens)


class CTCHead(TaskHead):
    """Per-frame LayerNorm -> Linear(D, V) trained with CTC (blank = 0) over characters or words;
    greedy decoding."""

    task = "asr"

    def __init__(self, hidden_size: int, vocab: CharVocab | WordVocab | None = None, dropout: float = 0.1):
        super().__init__()
        self.vocab = vocab or CharVocab()
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, len(self.vocab))

    def targets(self, texts: Sequence[str]) -> Targets:
        seqs = [self.vocab.encode(t) for t in texts]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        ids = torch.full((len(seqs), max([1, *map(len, seqs)])), IGNORE, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return Targets(ids, lengths)

    def logits(self, hidden, frame_mask, targets=None):
        """Per-frame scores ``[B, T, V]`` (unnormalised)."""
        return self.proj(self.dropout(self.norm(hidden)))

    @staticmethod
    def frame_lengths(logits: Tensor, frame_mask: Tensor | None) -> Tensor:
        if frame_mask is None:
            return torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        return frame_mask.sum(1).long()

    def example_losses(self, logits, frame_mask, targets):
        """CTC loss of each example divided by its target length ``[B]``."""
        log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)  # [T, B, V]
        losses = F.ctc_loss(log_probs, targets.ids.clamp(min=0), self.frame_lengths(logits, frame_mask),
                            targets.lengths, blank=0, reduction="none", zero_infinity=True)
        return losses / targets.lengths.clamp(min=1)

    def loss_from_logits(self, logits, frame_mask, targets):
        """Mean over the batch of CTC loss per target token (PyTorch's ``reduction='mean'``)."""
        return self.example_losses(logits, frame_mask, targets).mean()

    def decode(self, logits, frame_mask):
        """Greedy CTC: best token per frame, repeats collapsed, blanks dropped."""
        best = logits.argmax(-1)
        out = []
        for row, n in zip(best.tolist(), self.frame_lengths(logits, frame_mask).tolist()):
            ids = [t for i, t in enumerate(row[:n]) if i == 0 or t != row[i - 1]]
            out.append(self.vocab.decode(ids))
        return out

    def spec(self) -> dict:
        return {"type": "ctc", "unit": self.vocab.unit, "vocab": self.vocab.tokens[2:]}


def build_head(task: str, hidden_size: int, labels: Sequence[str] | None = None, vocab: CharVocab | WordVocab | None = None) -> TaskHead:
    """A fresh head for ``task``: kws over ``labels`` (default: the 12 keyword labels), asr over ``vocab``."""
    if task == "kws":
        if labels is None:
            from ..data.labels import LABELS

            labels = LABELS
        return ClassificationHead(hidden_size, labels)
    if task == "asr":
        return CTCHead(hidden_size, vocab)
    raise ValueError(f"unknown task {task!r} (kws or asr)")


def with_head(backbone: nn.Module, task: str = "kws", **kwargs) -> tuple[nn.Module, TaskHead]:
    """``(backbone, head)`` for ``DynamicModel(*with_head(backbone))``: a fresh head sized to the backbone."""
    return backbone, build_head(task, backbone.config.hidden_size, **kwargs)


def head_from_spec(spec: dict, hidden_size: int, backbone=None) -> TaskHead:
    """Rebuild a head from ``spec()`` (as stored in a run folder's ``model.json``).

    ``whisper_decoder`` needs ``backbone``: the loaded ``WhisperForConditionalGeneration`` whose decoder
    the head uses, with its tokenizer in the folder it was loaded from. Raises ValueError otherwise."""
    kind = spec.get("type")
    if kind == "classification":
        return ClassificationHead(hidden_size, spec["labels"])
    if kind == "ctc":
        return CTCHead(hidden_size, vocab_from_spec(spec.get("unit", "char"), spec["vocab"]))  # runs before word units: char
    if kind == "whisper_decoder":
        from .whisper_head import whisper_head_from_spec

        return whisper_head_from_spec(spec, backbone)
    raise ValueError(f"unknown head type {kind!r} (expected classification, ctc or whisper_decoder)")


def copy_head(head: TaskHead) -> TaskHead:
    """An independent copy, so a strategy can fine-tune its own head from a shared start."""
    return copy.deepcopy(head)
