"""List files read as people write them: property-based over spellings, encodings and line ends."""

from __future__ import annotations

import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldfleet.common.data.lists import decode_list, match_lists, read_list

WORDS = ("yes", "no", "café", "naïve", "Up")
CLIPS = [f"{w}/{s}_nohash_{n}.wav" for w in WORDS for s in ("aa11", "bb22", "Ünï") for n in (0, 1)]
PREFIXES = ("", "./", ".\\", "/", "/data/speech_commands_v0.02/", "C:\\Users\\me\\sc\\", "speech_commands/",
            "file:///srv/sc/", "../sc/")
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "cp1252", "latin-1")
NEWLINES = ("\n", "\r\n", "\r")


@st.composite
def spelling(draw, rel: str) -> str:
    """One way a person (or a tool) writes ``rel`` in a list file."""
    sep = draw(st.sampled_from(("/", "\\")))
    text = draw(st.sampled_from(PREFIXES)) + rel.replace("/", sep)
    text = unicodedata.normalize(draw(st.sampled_from(("NFC", "NFD"))), text)  # macOS writes NFD
    quote = draw(st.sampled_from(("", '"', "'")))
    return draw(st.sampled_from(("", " ", "\t"))) + quote + text + quote + draw(st.sampled_from(("", " ", "\t")))


@st.composite
def list_file(draw):
    rels = draw(st.lists(st.sampled_from(CLIPS), min_size=1, max_size=6, unique=True))
    lines = []
    for rel in rels:
        lines.extend(draw(st.lists(st.sampled_from(("", "   ", "# a comment", "  # indented comment")), max_size=2)))
        lines.append(draw(spelling(rel)))
    newline = draw(st.sampled_from(NEWLINES))
    text = newline.join(lines) + draw(st.sampled_from(("", newline)))
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding in ("cp1252", "latin-1"):  # one byte per character: no combining marks (NFD) there
        text = unicodedata.normalize("NFC", text)
    return rels, text, encoding


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=list_file())
def test_every_spelling_matches_its_clip(tmp_path, case):
    rels, text, encoding = case
    path = tmp_path / "validation_list.txt"
    path.write_bytes(text.encode(encoding))
    match = match_lists({"val": path}, CLIPS)
    assert match.unmatched == []
    assert match.listed == {rel: "val" for rel in rels}
    assert match.stats["val"]["entries"] == match.stats["val"]["matched"] == len(rels)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
       encoding=st.sampled_from(("utf-8", "utf-8-sig", "utf-16")))
def test_decoding_round_trips_text_with_a_bom_or_in_utf8(text, encoding):
    decoded, _ = decode_list(text.encode(encoding))
    assert decoded == text


def test_entries_matching_nothing_are_reported_with_line_and_reason(tmp_path):
    path = tmp_path / "testing_list.txt"
    path.write_text("# header\nyes/aa11_nohash_0.wav\n\nyes/zz99_nohash_0.wav\nsomething else\naa11_nohash_1.wav\n")
    match = match_lists({"test": path}, CLIPS, skipped_rels=["yes/zz99_nohash_0.wav"])
    assert match.listed == {"yes/aa11_nohash_0.wav": "test"}
    assert [(e.line, e.text, reason) for e, reason in match.unmatched] == [
        (5, "something else", "no clip at this path"),
        (6, "aa11_nohash_1.wav", "no clip at this path"),  # a bare name is ambiguous across word folders
    ]
    assert match.stats["test"] == {"file": "testing_list.txt", "encoding": "utf-8", "entries": 4, "matched": 1,
                                   "skipped_files": 1, "unmatched": 2}


def test_case_only_differences_match_when_unique_and_are_named_when_ambiguous(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("YES/AA11_NOHASH_0.WAV\nx/a.wav\n")
    match = match_lists({"val": path}, ["yes/aa11_nohash_0.wav", "x/A.wav", "X/a.WAV"])
    assert match.listed == {"yes/aa11_nohash_0.wav": "val"}
    assert "ambiguous" in match.unmatched[0][1]


def test_read_list_skips_bom_blank_and_comment_lines(tmp_path):
    path = tmp_path / "validation_list.txt"
    path.write_bytes("\ufeff# c\r\n\r\n./yes/a.wav\r\n".encode("utf-16"))
    entries, encoding = read_list(path, "val")
    assert encoding == "utf-16" and [(e.line, e.text) for e in entries] == [(3, "./yes/a.wav")]
