"""Read split list files (``validation_list.txt``, ``testing_list.txt``) as people actually write them.

Real lists come from many hands: ``./yes/x.wav``, ``yes\\x.wav`` (Windows), ``/data/sc/yes/x.wav``
or ``C:\\sc\\yes\\x.wav`` (absolute prefixes), UTF-8 with or without BOM, UTF-16 from PowerShell,
latin-1/cp1252 from old editors, CRLF line ends, blank lines, ``#`` comments, quoted paths,
decomposed (NFD, macOS) accents. Every entry is reduced to path components and matched to a clip
by its longest trailing run of components equal to a clip's relative path (case-insensitively if
that alone is unique). Entries that match nothing are kept and reported, never dropped silently.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

COMMENT = "#"


@dataclass(frozen=True)
class ListEntry:
    """One non-blank, non-comment line of a list file."""

    file: str  # list file name, e.g. validation_list.txt
    line: int  # 1-based line number
    text: str  # the entry as written (whitespace stripped)
    split: str  # the split this list feeds

    def as_dict(self, reason: str = "") -> dict:
        out = {"list": self.file, "line": self.line, "entry": self.text, "split": self.split}
        return {**out, "reason": reason} if reason else out


def decode_list(raw: bytes) -> tuple[str, str]:
    """``(text, encoding)``: BOMs first, then NUL-byte patterns (UTF-16 without BOM), UTF-8, cp1252, latin-1."""
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            return raw.decode(enc), enc
    if len(raw) >= 2 and raw.count(0) * 3 >= len(raw):  # ASCII text in UTF-16 is half NULs
        enc = "utf-16-le" if raw[1::2].count(0) > raw[0::2].count(0) else "utf-16-be"
        return raw.decode(enc, errors="replace"), enc
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), "latin-1"


def entry_parts(text: str) -> tuple[str, ...]:
    """Path components of an entry: quotes, ``./``, ``\\``, empty parts dropped; NFC-normalised."""
    text = unicodedata.normalize("NFC", text.strip().strip("\"'").strip())
    return tuple(p for p in text.replace("\\", "/").split("/") if p not in ("", "."))


def read_list(path: str | Path, split: str) -> tuple[list[ListEntry], str]:
    """``(entries, encoding)`` of one list file; blank lines and ``#`` comments are not entries."""
    path = Path(path)
    text, encoding = decode_list(path.read_bytes())
    entries = []
    for i, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip().lstrip("\ufeff").strip()
        if stripped and not stripped.startswith(COMMENT) and entry_parts(stripped):
            entries.append(ListEntry(path.name, i, stripped, split))
    return entries, encoding


def _key(parts: Iterable[str]) -> str:
    return "/".join(parts)


@dataclass
class ListMatch:
    """Entries resolved against the clips (and the files that were skipped) of one folder."""

    listed: dict[str, str] = field(default_factory=dict)  # clip rel -> split
    unmatched: list[tuple[ListEntry, str]] = field(default_factory=list)  # (entry, reason)
    stats: dict[str, dict] = field(default_factory=dict)  # split -> file, encoding, entries, matched, ...


class PathIndex:
    """Relative paths of a folder's files, looked up by the trailing components of a list entry."""

    def __init__(self, rels: Iterable[str]):
        self.exact: dict[str, str] = {}
        self.folded: dict[str, list[str]] = {}
        for rel in rels:
            key = _key(entry_parts(rel))
            self.exact[key] = rel
            self.folded.setdefault(key.casefold(), []).append(rel)

    def find(self, parts: tuple[str, ...]) -> tuple[str | None, str]:
        """``(rel, "")`` for the longest matching suffix, or ``(None, reason)``."""
        shortest = min(2, len(parts))  # word/file at least: file names repeat across word folders
        for start in range(0, len(parts) - shortest + 1):
            key = _key(parts[start:])
            if key in self.exact:
                return self.exact[key], ""
            folded = self.folded.get(key.casefold(), [])
            if len(folded) == 1:
                return folded[0], ""
            if len(folded) > 1:
                return None, f"ambiguous: matches {len(folded)} files that differ only in case"
        return None, "no clip at this path"


def match_lists(lists: dict[str, Path], clip_rels: Iterable[str], skipped_rels: Iterable[str] = ()) -> ListMatch:
    """Resolve every entry of ``lists`` (split -> list file) against the folder's clip paths.

    Entries naming a file that was skipped (bad audio) count as ``skipped``, not as unmatched:
    the file itself is reported with its reason.
    """
    index = PathIndex(clip_rels)
    bad = PathIndex(skipped_rels)
    result = ListMatch()
    for split, path in lists.items():
        entries, encoding = read_list(path, split)
        matched = skipped = 0
        for entry in entries:
            parts = entry_parts(entry.text)
            rel, reason = index.find(parts)
            if rel is not None:
                result.listed[rel] = split
                matched += 1
            elif bad.find(parts)[0] is not None:
                skipped += 1
            else:
                result.unmatched.append((entry, reason))
        result.stats[split] = {"file": path.name, "encoding": encoding, "entries": len(entries),
                               "matched": matched, "skipped_files": skipped,
                               "unmatched": len(entries) - matched - skipped}
    return result
