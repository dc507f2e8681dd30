"""Task metrics and the one text normaliser shared by training targets and scoring.

* kws: accuracy of predicted label names;
* asr: word and character error rates from jiwer (edit distance / reference length, summed over
  the corpus, as jiwer computes them), after :func:`normalize_text` on both sides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


def _not_word_to_space(text: str) -> str:
    """Every character that is not a letter, mark (vowel signs of Devanagari and Thai, Hebrew points,
    combining accents, which ``\\w`` leaves out), number, apostrophe or space becomes a space."""
    return "".join(c if c in "' " or unicodedata.category(c)[0] in "LMN" else " " for c in text)


_SPACES = re.compile(r"\s+")
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u0060\u00b4"})  # typographic and modifier apostrophes
_QUOTE = re.compile(r"(?<!\w)'|'(?!\w)")  # an apostrophe not inside a word: a quotation mark


def normalize_text(text: str) -> str:
    """The one normalisation of transcripts, for training targets and scoring alike: Unicode NFKC,
    lower case, typographic apostrophes (’ ‘ ʼ) as ', punctuation stripped, apostrophes kept only
    inside words (don't; 'hi' -> hi), whitespace collapsed. Numbers stay as written: "10" and "ten"
    are different words."""
    text = unicodedata.normalize("NFKC", text).lower().replace("_", " ").translate(_APOSTROPHES)
    return _SPACES.sub(" ", _QUOTE.sub(" ", _not_word_to_space(text))).strip()


def error_counts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Word/char edits and reference lengths, so rates can be summed over batches or groups."""
    import jiwer

    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(p) for p in predictions]
    # jiwer refuses empty references; an empty reference costs one insertion per hypothesis word.
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    out = {"word_edits": sum(len(h.split()) for r, h in zip(refs, hyps) if not r), "words": 0,
           "char_edits": sum(len(h) for r, h in zip(refs, hyps) if not r), "chars": 0}
    if pairs:
        r, h = [p[0] for p in pairs], [p[1] for p in pairs]
        words = jiwer.process_words(r, h)
        chars = jiwer.process_characters(r, h)
        out["word_edits"] += words.substitutions + words.deletions + words.insertions
        out["words"] += sum(len(x.split()) for x in r)
        out["char_edits"] += chars.substitutions + chars.deletions + chars.insertions
        out["chars"] += sum(len(x) for x in r)
    return out


def error_rates(counts: dict[str, int]) -> dict[str, float]:
    """``{"wer", "cer"}`` from ``error_counts`` (edits / reference length; may exceed 1)."""
    return {"wer": counts["word_edits"] / max(1, counts["words"]), "cer": counts["char_edits"] / max(1, counts["chars"])}


def metric_label(metric: str) -> str:
    """How a score is named in tables and plots: ``"WER"`` for ``wer``, else the name as it is."""
    return "WER" if metric == "wer" else metric


def example_errors(task: str, predictions: Sequence[str], references: Sequence[str], unit: str = "word") -> list[float]:
    """Errors of each example: 0 or 1 (kws: wrong label); asr: its word edits (``unit="word"``) or
    character edits (``"char"``). Raises ValueError on an unknown task or unit."""
    if task == "kws":
        return [float(p != r) for p, r in zip(predictions, references)]
    if task != "asr" or unit not in ("word", "char"):
        raise ValueError(f"errors of task {task!r} in unit {unit!r}: kws, or asr with word or char")
    return [float(error_counts([p], [r])[f"{unit}_edits"]) for p, r in zip(predictions, references)]


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """kws -> ``{"accuracy"}``; asr -> ``{"wer", "cer"}``. Raises ValueError on an unknown task."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if task == "kws":
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))}
    if task == "asr":
        return error_rates(error_counts(predictions, references))
    raise ValueError(f"unknown task {task!r} (kws or asr)")
