"""Task metrics and the one text normaliser used by training targets and scoring alike.

asr: word and character error rates from jiwer over the whole set (edits / reference length),
after :func:`normalize_text` on references and predictions. kws: accuracy of label names.
(Same API as the task/head interface's ``common/metrics.py``; branch i9-asr writes the full one.)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


def normalize_text(text: str) -> str:
    """Lower-case, punctuation stripped (apostrophes kept), whitespace collapsed; numbers as written."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w' ]+|_", " ", text)
    return " ".join(text.split())


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """kws -> ``{"accuracy"}``; asr -> ``{"wer", "cer"}`` (jiwer). ValueError on an unknown task."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if task == "kws":
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))}
    if task != "asr":
        raise ValueError(f"unknown task {task!r} (kws or asr)")
    import jiwer

    pairs = [(normalize_text(r), normalize_text(p)) for r, p in zip(references, predictions)]
    pairs = [(r, p) for r, p in pairs if r]  # jiwer needs non-empty references
    if not pairs:
        raise ValueError("no non-empty reference transcripts to score")
    refs, hyps = [r for r, _ in pairs], [p for _, p in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}
