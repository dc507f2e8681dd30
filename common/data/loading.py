"""One entry point from ``--task`` and ``--data`` to train/val/test datasets of ``(waveform, text)``.

* kws: a Speech Commands-layout folder; ``text`` is the clip's class name under the chosen label
  set (clips the set has no place for are left out);
* asr: an audiofolder or JSON-lines manifest (:mod:`.transcribed`); ``text`` is the transcript.

:func:`pad_batch` is the collate function for both: waveforms of any length padded to the
longest, with a sample mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

TASKS = ("kws", "asr")
log = logging.getLogger("ldfleet.data")


class KeywordDataset(Dataset):
    """A :class:`~.dataset.ClipDataset` seen through a label set: ``(waveform, label name)``."""

    def __init__(self, clips, labels: Sequence[str]):
        from .labels import label_for

        names = [label_for(c.word, c.is_silence, labels) for c in clips.clips]
        keep = [i for i, n in enumerate(names) if n is not None]
        self.clips = clips.subset(keep) if len(keep) != len(names) else clips
        self.texts = [names[i] for i in keep]
        self.speakers = self.clips.speakers

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.clips[index][0], self.texts[index]

    def subset(self, indices: Sequence[int]) -> KeywordDataset:
        """The clips at ``indices``, sharing already-loaded audio."""
        idx = list(indices)
        sub = KeywordDataset.__new__(KeywordDataset)
        sub.clips, sub.texts = self.clips.subset(idx), [self.texts[i] for i in idx]
        sub.speakers = sub.clips.speakers
        return sub

    @staticmethod
    def join(parts: Sequence[KeywordDataset]) -> KeywordDataset:
        """One dataset of every clip of ``parts``, in order."""
        from .dataset import ClipDataset

        out = KeywordDataset.__new__(KeywordDataset)
        out.clips = ClipDataset.join([part.clips for part in parts])
        out.texts = [t for part in parts for t in part.texts]
        out.speakers = out.clips.speakers
        return out


@dataclass
class TaskData:
    splits: dict[str, Dataset]  # train / val / test, items (waveform, text)
    labels: tuple[str, ...] | None  # the label set (kws), None for asr


def folder_words(root: str | Path) -> list[str]:
    """Word folders of a Speech Commands-layout folder (what the 'folder' label set uses)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def load_task_data(task: str, data: str | Path, seed: int = 0, labels: str = "keywords", strict: bool = False) -> TaskData:
    """Speaker-disjoint splits for ``task``; raises ValueError / FileNotFoundError on unusable data.

    Every clip is checked when loaded (:mod:`.validate`): a bad one is skipped and logged, or with
    ``strict`` stops the load with :class:`~.validate.BadClip` naming the file.
    """
    if task == "asr":
        from .transcribed import load_transcribed_splits

        return TaskData(dict(load_transcribed_splits(data, seed=seed, strict=strict)), None)
    if task != "kws":
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    from .folder import load_splits

    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist (make one with `ldfleet data synth --out {data}`)")
    return keyword_task_data(load_splits(data, seed=seed, strict=strict), data, labels)


def keyword_task_data(splits: dict, data: str | Path, labels: str = "keywords") -> TaskData:
    """Speech Commands splits (:class:`~.dataset.ClipDataset` each) seen through a label set."""
    from .labels import resolve_label_set

    words = folder_words(data)
    label_set = resolve_label_set(labels, words)
    for warning in label_set_warnings(label_set, words, [c.word for ds in splits.values() for c in ds.clips]):
        log.warning("%s: %s", data, warning)
    return TaskData({name: KeywordDataset(ds, label_set) for name, ds in splits.items()}, label_set)


def label_set_warnings(labels: Sequence[str], folders: Sequence[str], clip_words: Sequence[str]) -> list[str]:
    """What a label set will not do as probably meant on a corpus: labels with no word folder (a typo,
    or a case that differs: folders are matched exactly), and clips left out because their word is
    not in the set and the set has no ``_unknown_``."""
    from .labels import BACKGROUND_NOISE_DIR, SILENCE, UNKNOWN

    out = []
    present = set(folders)
    by_lower = {f.lower(): f for f in folders}
    for label in labels:
        if label in (UNKNOWN, SILENCE) or label in present:
            continue
        near = by_lower.get(label.lower())
        out.append(f"label {label!r} has no folder" + (f" (there is {near!r}: folders are matched exactly)" if near else ""))
    if UNKNOWN not in labels:
        left = sorted({w for w in clip_words if w not in labels and w not in (SILENCE, BACKGROUND_NOISE_DIR)})
        count = sum(1 for w in clip_words if w in left)
        if count:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            out.append(f"{count} clip(s) of words outside the label set left out ({shown}); add _unknown_ to the set to "
                       "train them as unknown")
    return out


def pad_batch(items: Sequence[tuple[Tensor, str]]) -> tuple[Tensor, Tensor | None, list[str]]:
    """Collate ``(waveform, text)`` items: ``(waves [B, N], mask [B, N] long or None, texts)``.

    The mask (1 = real sample) is None when every waveform has the same length. Integer labels
    (what a plain :class:`~.dataset.ClipDataset` yields) are ids of the 12-label keyword set.
    """
    from .labels import LABELS

    waves = [w for w, _ in items]
    texts = [t if isinstance(t, str) else LABELS[int(t)] for _, t in items]
    n = max(len(w) for w in waves)
    if all(len(w) == n for w in waves):
        return torch.stack(waves), None, texts
    out = torch.zeros(len(waves), n)
    mask = torch.zeros(len(waves), n, dtype=torch.long)
    for i, w in enumerate(waves):
        out[i, : len(w)] = w
        mask[i, : len(w)] = 1
    return out, mask, texts
