"""Read any folder in Google Speech Commands layout: real Speech Commands or our synthetic corpus.

Layout: ``ROOT/<word>/<speaker>_nohash_<n>.wav``. The 10 keywords are their own classes,
``_silence_`` is silence, 1 s windows of ``ROOT/_background_noise_/*.wav`` are silence too, and
every other word folder is ``_unknown_``. Scanning decodes and checks every file once
(:mod:`.validate`): bad files are skipped and reported, hidden and non-audio files are never clips.
Audio for training is then loaded by :class:`~.dataset.ClipDataset`.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .clip import Clip
from .dataset import ClipDataset
from .labels import BACKGROUND_NOISE_DIR, LABEL_TO_ID, SILENCE, label_counts, label_id
from .lists import ListMatch, match_lists
from .splits import DEFAULT_FRACTIONS, LIST_FILES, SPLITS, assign_splits, check_fractions, list_files
from .validate import BadClip, Skipped, check_samples, is_candidate, is_clip_dir, is_hidden, read_checked, read_frames

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]

METADATA = "metadata.csv"
NOHASH = "_nohash_"
BACKGROUND_WINDOWS_PER_SPEAKER = 10  # 10 s of one noise recording = one pseudo-speaker for splitting


def speaker_from_filename(name: str) -> str:
    """Speech Commands convention ``<speaker>_nohash_<n>.wav``; other names are their own speaker."""
    stem = Path(name).stem
    return stem.split(NOHASH, 1)[0] if NOHASH in stem else stem


def _metadata(root: Path) -> dict[str, dict[str, str]]:
    """Rows of ``metadata.csv`` by relative path (our corpus has one; real Speech Commands does not)."""
    meta = root / METADATA
    if not meta.is_file():
        return {}
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            return {}
        return {row["path"]: row for row in reader}


def _candidates(folder: Path, ignored: Counter) -> list[Path]:
    """Files of ``folder`` that may be clips; hidden and non-audio files are counted in ``ignored``."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if is_hidden(p):
            ignored["hidden"] += 1
        elif not is_candidate(p):
            ignored["not_audio"] += 1
        else:
            out.append(p)
    return out


@dataclass
class FolderScan:
    """Clips that passed the checks, files (or noise windows) that did not, and entries that are no clips."""

    clips: list[Clip] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # "hidden" / "not_audio" -> files

    def reject(self, error: BadClip, strict: bool) -> None:
        """Record a bad file, or raise it when ``strict``."""
        if strict:
            raise error
        self.skipped.append(error.skipped())


def _background_windows(path: Path, scan: FolderScan, strict: bool) -> None:
    """1 s windows of one noise recording; windows holding NaN/Inf are rejected one by one."""
    try:
        data, sr = read_frames(path)
    except BadClip as exc:
        scan.reject(exc, strict)
        return
    window = sr  # 1 s in the file's own rate
    for k in range(len(data) // window):
        try:
            check_samples(f"{path}#{k}", data[k * window : (k + 1) * window])
        except BadClip as exc:
            scan.reject(exc, strict)
            continue
        scan.clips.append(Clip(
            rel=f"{BACKGROUND_NOISE_DIR}/{path.name}#{k}", path=path, label=LABEL_TO_ID[SILENCE],
            speaker=f"bg-{path.stem}-{k // BACKGROUND_WINDOWS_PER_SPEAKER}", word=BACKGROUND_NOISE_DIR,
            start=k * window, frames=window,
        ))


def scan(root: str | Path, strict: bool = False, progress: Progress | None = None) -> FolderScan:
    """Every clip under ``root``, checked (decoded once), in a deterministic order.

    Bad files are skipped with their reason (see :mod:`.validate`), or with ``strict`` the first one
    raises :class:`~.validate.BadClip` naming it. ``progress(done, total)`` is called per file.
    Raises FileNotFoundError / NotADirectoryError for a missing root, ValueError when no clip is left.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist (make one with `ldfleet data synth --out {root}`)")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} is not a directory")
    meta = _metadata(root)
    result = FolderScan()
    folders = [p for p in sorted(root.iterdir()) if is_clip_dir(p)]
    files = [(folder, path) for folder in folders for path in _candidates(folder, result.ignored)]
    for done, (folder, path) in enumerate(files, start=1):
        if progress is not None:
            progress(done, len(files))
        if folder.name == BACKGROUND_NOISE_DIR:
            _background_windows(path, result, strict)
            continue
        try:
            read_checked(path)
        except BadClip as exc:
            result.reject(exc, strict)
            continue
        rel = f"{folder.name}/{path.name}"
        row = meta.get(rel, {})
        speaker = row.get("speaker") or speaker_from_filename(path.name)
        word = row.get("word") or folder.name  # our _unknown_ folder holds many words
        result.clips.append(Clip(rel=rel, path=path, label=label_id(folder.name), speaker=speaker, word=word))
    silence = [c for c in result.clips if c.word == BACKGROUND_NOISE_DIR]
    result.clips = [c for c in result.clips if c.word != BACKGROUND_NOISE_DIR] + silence  # words first, as before
    if not result.clips:
        why = f"; {len(result.skipped)} files were skipped, e.g. {result.skipped[0].path}: {result.skipped[0].reason}" \
            if result.skipped else ""
        raise ValueError(f"no usable audio clips under {root}: expected <word>/<speaker>_nohash_<n>.wav "
                         f"(Speech Commands layout){why}")
    return result


def scan_folder(root: str | Path, strict: bool = False) -> list[Clip]:
    """All usable clips under ``root`` (see :func:`scan`; bad files are left out and logged)."""
    result = scan(root, strict)
    _log_skipped(result)
    return result.clips


def _log_skipped(result: FolderScan) -> None:
    for s in result.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)


@dataclass
class FolderReport:
    """A scanned folder with the split of every clip: what ``ldfleet data info`` shows and loaders log.

    ``lists`` is None when the folder has no official list files (then splits hold out speakers).
    """

    root: Path
    scan: FolderScan
    names: list[str]  # split name of every clip in scan.clips
    lists: ListMatch | None
    seed: int
    fractions: tuple[float, ...]

    def split_clips(self, split: str) -> list[Clip]:
        return [c for c, n in zip(self.scan.clips, self.names) if n == split]

    @property
    def official_lists(self) -> bool:
        return self.lists is not None

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """split -> label -> clips."""
        return {s: label_counts([c.label for c in self.split_clips(s)]) for s in SPLITS}

    @property
    def speakers(self) -> dict[str, int]:
        return {s: len({c.speaker for c in self.split_clips(s)}) for s in SPLITS}

    @property
    def words(self) -> dict[str, int]:
        """Spoken word (or folder) -> clips: shows what _unknown_ is made of."""
        return dict(sorted(Counter(c.word for c in self.scan.clips).items()))

    def _empty_split_reason(self, split: str) -> str:
        if self.lists is None:
            n = len({c.speaker for c in self.scan.clips if not c.is_silence})
            return f"{n} speakers are too few for fractions {','.join(f'{f:g}' for f in self.fractions)}"
        st = self.lists.stats.get(split)
        if st is None:
            return f"the folder has other list files but no {LIST_FILES[split]}"
        return (f"{st['file']} has {st['entries']} entries: {st['matched']} match a clip, "
                f"{st['skipped_files']} name skipped files, {st['unmatched']} match nothing")

    @property
    def warnings(self) -> list[str]:
        """Plain sentences, with numbers, for everything a user should not miss."""
        out = []
        sizes = {s: len(self.split_clips(s)) for s in SPLITS}
        for split in SPLITS:
            wanted = self.lists is not None or self.fractions[SPLITS.index(split)] > 0
            if sizes[split] == 0 and wanted:
                out.append(f"{split} split is empty: {self._empty_split_reason(split)}")
        if self.scan.skipped:
            out.append(f"{len(self.scan.skipped)} bad audio files/windows skipped (see skipped)")
        if self.lists is not None and self.lists.unmatched:
            out.append(f"{len(self.lists.unmatched)} list entries match no clip (see unmatched_list_entries)")
        return out

    def as_dict(self) -> dict:
        """The JSON of ``ldfleet data info --json``."""
        counts, speakers = self.counts, self.speakers
        return {
            "root": str(self.root),
            "split_method": "official lists" if self.lists is not None else "speakers",
            "seed": self.seed,
            "fractions": list(self.fractions),
            "splits": {s: {"clips": sum(counts[s].values()), "speakers": speakers[s], "labels": counts[s]} for s in SPLITS},
            "lists": self.lists.stats if self.lists is not None else {},
            "skipped": [s.as_dict() for s in self.scan.skipped],
            "unmatched_list_entries": [e.as_dict(reason) for e, reason in (self.lists.unmatched if self.lists else [])],
            "ignored_files": dict(sorted(self.scan.ignored.items())),
            "words": self.words,
            "warnings": self.warnings,
        }


def describe(
    root: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strict: bool = False,
    progress: Progress | None = None,
) -> FolderReport:
    """Scan ``root`` (every clip checked) and split it: official lists if present, else by speaker."""
    fractions = check_fractions(fractions)
    result = scan(root, strict, progress)
    lists = list_files(root)
    match = None
    if lists:
        skipped_rels = [Path(s.path).relative_to(root).as_posix() for s in result.skipped if "#" not in s.path]
        match = match_lists(lists, [c.rel for c in result.clips], skipped_rels)
    names = assign_splits(result.clips, match.listed if match else None, fractions, seed)
    return FolderReport(Path(root), result, names, match, seed, tuple(fractions))


def load_folder(
    root: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    preload: bool = True,
    strict: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, ClipDataset], FolderReport]:
    """``({"train", "val", "test"} datasets, report)``: the report names what was skipped and why."""
    report = describe(root, seed, fractions, strict, progress)
    return {s: ClipDataset(report.split_clips(s), preload=preload) for s in SPLITS}, report


def load_splits(
    root: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    preload: bool = True,
    strict: bool = False,
) -> dict[str, ClipDataset]:
    """``{"train", "val", "test"}`` datasets for a Speech Commands-layout folder, speaker-disjoint.

    What was skipped or left unmatched is logged as warnings; use :func:`load_folder` for the report.
    """
    splits, report = load_folder(root, seed, fractions, preload, strict)
    for line in report.warnings:
        log.warning("%s: %s", root, line)
    _log_skipped(report.scan)
    return splits
