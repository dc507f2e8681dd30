"""`ldfleet data ...`: make the espeak-ng keyword corpus and inspect any Speech Commands-layout folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldfleet.commands._shared import console, err, fail, finite
from ldfleet.common.data.espeak import ACCENT_VOICES, DEFAULT_VARIANTS, ENGLISH_VOICES, EspeakError
from ldfleet.common.data.labels import LABELS, UNKNOWN_WORDS


SYNTH_HELP = (
    "Synthesize a keyword-spotting (--task kws) or speech-recognition (--task asr) corpus with espeak-ng.\n\n"
    "asr: phrases of several words (commands, digit strings, names) from English voices and other "
    "languages as accents, at varied speed and pitch, with noise at 5-30 dB SNR or none, and telephone "
    "or reverberant variants; written as a Hugging Face audiofolder (OUT/metadata.csv with "
    "file_name,transcription,speaker,split,... and OUT/clips/*.wav), whole speakers per split. "
    "The defaults give 6 480 utterances from 72 speakers in about 1.5 min on 2 cores.\n\n"
    "kws: "
    "The 10 keywords, other Speech Commands words as _unknown_, and noise as _silence_, spoken by "
    "voice+variant speakers (e.g. en-us+f3) at varied speed, pitch and loudness, written as 16 kHz mono "
    "16-bit WAV in OUT/<label>/<speaker>_nohash_<n>.wav with OUT/metadata.csv. "
    "The defaults give 3 072 clips from 64 speakers (256 per class) in about half a minute on 2 cores."
)
INFO_HELP = (
    "Show clips per label and split, and speakers per split, for any Speech Commands-layout folder "
    "(for an audiofolder or manifest: utterances, speakers and words per split).\n\n"
    "Splits hold out whole speakers; a folder with validation_list.txt/testing_list.txt "
    "(real Speech Commands) uses those lists instead, read as people write them (./ or \\ or absolute "
    "prefixes, UTF-8/UTF-16/latin-1, CRLF, # comments).\n\n"
    "Every file is decoded and checked: undecodable, empty (0 frames), non-finite (NaN/Inf) or "
    "implausible-rate audio is skipped and listed with its reason (--strict: stop at the first one); "
    "hidden files (.DS_Store, AppleDouble ._x.wav) and non-audio files are never clips. List entries "
    "that match no clip and empty splits are reported. --json prints one object with splits, skipped, "
    "unmatched_list_entries, lists, ignored_files and warnings."
)


STRICT_HELP = "Stop at the first bad audio file (naming it and why) instead of skipping it."


@contextmanager
def file_progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr, fed as ``progress(done, total)``; stdout stays clean."""
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def load_data(data: Path, seed: int, strict: bool = False) -> dict:
    """``{"train", "val", "test"}`` datasets of a folder for train/eval; what was skipped goes to stderr.

    Exits with a clear error for a missing or unusable folder, or (``strict``) the first bad file.
    """
    from ldfleet.common.data.folder import load_folder

    try:
        with file_progress("checking audio files") as progress:
            splits, report = load_folder(data, seed=seed, strict=strict, progress=progress)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        fail(f"cannot load data from {data}: {exc}")
    for line in report.warnings:
        err.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    _print_some("skipped:", [f"{s.path}: {s.reason}" for s in report.scan.skipped], limit=5)
    return splits


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _voices(text: Optional[str], pool: tuple[str, ...] = ENGLISH_VOICES) -> tuple[str, ...]:
    """``None``/``all``: every voice of ``pool``; a number N: its first N (as a scenario's ``voices``
    counts them); else a comma-separated list."""
    if text is None or text == "all":
        return pool
    if text.isdigit() or (text.startswith("-") and text[1:].isdigit()):  # a count, or a negative one to refuse
        n = int(text)
        if not 1 <= n <= len(pool):
            raise typer.BadParameter(f"between 1 and {len(pool)} voices, got {n}", param_hint="--voices")
        return pool[:n]
    voices = _csv_list(text)
    if not voices:
        raise typer.BadParameter("no voices given", param_hint="--voices")
    return voices


def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the corpus to (kws: Speech Commands layout; asr: audiofolder)."),
    task: str = typer.Option("kws", help="kws (keyword clips) or asr (transcribed phrases)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives byte-identical files."),
    voices: Optional[str] = typer.Option(
        None, help=f"espeak-ng voices (accents): a count N (the first N of {', '.join(ENGLISH_VOICES)}, and for asr then "
        f"{', '.join(ACCENT_VOICES)} as foreign accents), 'all' (default: all of them), or a comma-separated list.",
        show_default=False,
    ),
    variants_per_voice: Optional[int] = typer.Option(None, min=1, help="Variants (timbres) drawn per voice; speakers = voices x this \\[default: kws 8, asr 6].", show_default=False),
    utterances_per_speaker: int = typer.Option(90, min=1, help="asr: utterances per speaker."),
    variants: Optional[str] = typer.Option(
        None, help=f"Comma-separated pool of espeak-ng variants to draw from (default: {len(DEFAULT_VARIANTS)} "
        "natural-sounding ones; see `espeak-ng --voices=variant`).", show_default=False,
    ),
    clips_per_word: int = typer.Option(4, help="Clips per speaker and keyword, each with its own speed/pitch/level."),
    unknown_words: str = typer.Option(",".join(UNKNOWN_WORDS), help="Comma-separated non-keywords spoken as _unknown_."),
    unknown_per_speaker: int = typer.Option(4, help="_unknown_ clips per speaker (words drawn from --unknown-words)."),
    silence_clips: int = typer.Option(256, help="_silence_ clips: white/pink/brown noise at low levels and near-silence."),
    snr_db: float = typer.Option(15.0, help="Lowest SNR (dB) of the background noise under speech; each clip draws SNR in [X, X+20].", callback=finite),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="Add background noise under speech clips."),
    workers: Optional[int] = typer.Option(None, help="Parallel espeak-ng processes \\[default: CPU cores].", show_default=False),
    overwrite: bool = typer.Option(False, help="Replace a corpus already in --out (only its label folders and metadata.csv)."),
) -> None:
    """Synthesize a keyword-spotting or speech-recognition corpus with espeak-ng (help text: SYNTH_HELP)."""
    from ldfleet.common.data.synth import SynthConfig, synthesize_corpus

    if task == "asr":
        return _synth_asr(out, seed, voices, variants, variants_per_voice or 6, utterances_per_speaker, noise, workers, overwrite)
    if task != "kws":
        raise typer.BadParameter(f"--task must be kws or asr, got {task!r}")
    try:
        cfg = SynthConfig(
            out=out, seed=seed, voices=_voices(voices),
            variants=_csv_list(variants) if variants else DEFAULT_VARIANTS,
            variants_per_voice=variants_per_voice or 8, clips_per_word=clips_per_word,
            unknown_words=_csv_list(unknown_words), unknown_per_speaker=unknown_per_speaker,
            silence_clips=silence_clips, noise=noise, snr_db=snr_db, workers=workers, overwrite=overwrite,
        )
        summary = synthesize_corpus(cfg, progress=True)
    except (EspeakError, FileExistsError, ValueError) as exc:
        fail(exc, 1)

    table = Table(title=f"{summary.out}: {summary.clips} clips in {summary.seconds:.1f} s")
    table.add_column("label")
    table.add_column("clips", justify="right")
    for label, n in summary.counts.items():
        table.add_row(label, str(n))
    console.print(table)
    console.print(f"speakers: {summary.speakers} espeak-ng (voice+variant) + {summary.noise_speakers} noise pseudo-speakers")
    _report_failures(summary.failures)
    if summary.clips == 0:
        fail("no clip could be synthesized", 1)


def _report_failures(failures: list[tuple[str, str]]) -> None:
    if failures:
        err.print(f"[yellow]{len(failures)} clips failed and were skipped:[/]")
        for path, reason in failures[:20]:
            err.print(f"  {path}: {reason}")
        if len(failures) > 20:
            err.print(f"  ... and {len(failures) - 20} more")


def _synth_asr(out: Path, seed: int, voices: Optional[str], variants: Optional[str], variants_per_voice: int,
               utterances_per_speaker: int, noise: bool, workers: Optional[int], overwrite: bool) -> None:
    """`data synth --task asr`: the espeak-ng phrase corpus as an audiofolder."""
    from ldfleet.common.data.synth_asr import AsrSynthConfig, synthesize_asr_corpus

    try:
        cfg = AsrSynthConfig(
            out=out, seed=seed, voices=_voices(voices, ENGLISH_VOICES + ACCENT_VOICES),
            variants=_csv_list(variants) if variants else DEFAULT_VARIANTS, variants_per_voice=variants_per_voice,
            utterances_per_speaker=utterances_per_speaker, noise=noise, workers=workers, overwrite=overwrite,
        )
        summary = synthesize_asr_corpus(cfg, progress=True)
    except (EspeakError, FileExistsError, ValueError) as exc:
        fail(exc, 1)
    table = Table(title=f"{summary.out}: {summary.utterances} utterances, {summary.seconds_of_audio / 60:.1f} min of audio, "
                        f"in {summary.seconds:.1f} s")
    for col in ("split", "utterances", "speakers"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, n in summary.speakers.items():
        table.add_row(split, str(summary.clips.get(split, 0)), str(n))
    console.print(table)
    _report_failures(summary.failures)
    if summary.utterances == 0:
        fail("no utterance could be synthesized", 1)
    empty = [split for split in ("train", "validation", "test") if not summary.clips.get(split)]
    if empty:
        err.print(f"[yellow]warning[/]: no speaker in {', '.join(empty)}: each voice's speakers (its variants) are split "
                  "into train, validation and test, so a voice reaches all three only with 3 or more; `ldfleet train` "
                  f"needs train and validation speakers: give --variants-per-voice 3 or more (now {variants_per_voice})",
                  soft_wrap=True)


def info(
    root: Path = typer.Argument(..., help="A Speech Commands-layout folder (ours or the real one)."),
    seed: int = typer.Option(0, help="Seed of the speaker split (as in training)."),
    fractions: str = typer.Option("0.8,0.1,0.1", help="train,val,test shares of the speakers."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: splits, skipped, unmatched_list_entries, ..."),
) -> None:
    """Print split statistics of a folder (help text: INFO_HELP)."""
    from ldfleet.common.data.folder import describe
    from ldfleet.common.data.transcribed import is_transcribed

    if root.exists() and is_transcribed(root):
        return _info_transcribed(root, seed, strict, as_json)

    try:
        shares = tuple(float(x) for x in _csv_list(fractions))
        with file_progress("checking audio files") as progress:
            report = describe(root, seed=seed, fractions=shares, strict=strict, progress=progress)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        fail(exc, 1)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    print_report(report)


def print_report(report) -> None:
    """The human view of a :class:`~ldfleet.common.data.folder.FolderReport`: the facts of its JSON."""
    facts = report.as_dict()
    if report.lists is not None:
        how = "official lists: " + ", ".join(
            f"{st['file']} {st['matched']}/{st['entries']} matched ({st['encoding']})" for st in report.lists.stats.values())
    else:
        how = f"speaker split, seed {report.seed}, {','.join(f'{f:g}' for f in report.fractions)}"
    console.print(f"{report.root}: {how}", soft_wrap=True, markup=False, highlight=False)
    table = Table()
    table.add_column("label")
    for split in facts["splits"]:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for label in LABELS:
        row = [facts["splits"][s]["labels"][label] for s in facts["splits"]]
        table.add_row(label, *map(str, row), str(sum(row)))
    totals = [facts["splits"][s]["clips"] for s in facts["splits"]]
    table.add_row("[bold]clips[/]", *map(str, totals), str(sum(totals)))
    table.add_row("[bold]speakers[/]", *(str(facts["splits"][s]["speakers"]) for s in facts["splits"]), "")
    console.print(table)
    unknown = {w: n for w, n in report.words.items() if w not in LABELS and not w.startswith("_")}
    if unknown:
        console.print("_unknown_ words: " + ", ".join(f"{w} ({n})" for w, n in unknown.items()))
    if facts["ignored_files"]:
        console.print("not clips (ignored): " + ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in facts["ignored_files"].items()),
                      soft_wrap=True)
    _print_some(f"skipped {len(facts['skipped'])} bad audio files/windows:",
                [f"{s['path']}: {s['reason']}" for s in facts["skipped"]])
    _print_some(f"{len(facts['unmatched_list_entries'])} list entries match no clip:",
                [f"{e['list']}:{e['line']} {e['entry']!r} ({e['reason']})" for e in facts["unmatched_list_entries"]])
    for line in facts["warnings"]:
        if line.split(" ", 1)[0] in facts["splits"]:  # the other warnings restate the two lists above
            err.print(f"[yellow]warning:[/] {line}", soft_wrap=True)


def _print_some(title: str, lines: list[str], limit: int = 20) -> None:
    if not lines:
        return
    err.print(f"[yellow]{title}[/]")
    for line in lines[:limit]:
        err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if len(lines) > limit:
        err.print(f"  ... and {len(lines) - limit} more (all of them: `ldfleet data info --json`)")


def _info_transcribed(root: Path, seed: int, strict: bool = False, as_json: bool = False) -> None:
    """`data info` for an audiofolder or manifest: utterances, speakers and words per split, every file
    decoded and checked (bad ones listed with their reason; ``strict``: stop at the first), a warning
    for each empty split (training needs validation and test speakers)."""
    from ldfleet.common.data.transcribed import assign_transcribed_splits, corpus_warnings, read_utterance, scan_transcribed
    from ldfleet.common.data.validate import BadClip

    try:
        items = scan_transcribed(root)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc, 1)
    skipped, seconds = [], {}
    with file_progress("checking audio files") as progress:
        for done, u in enumerate(items, 1):
            try:
                seconds[u.path] = len(read_utterance(u.path)) / 16000
            except BadClip as exc:
                if strict:
                    fail(f"{exc.path}: {exc.reason}", 1)
                skipped.append({"path": str(exc.path), "reason": exc.reason})
            progress(done, len(items))
    names = assign_transcribed_splits(items, seed=seed)
    splits = {}
    for split in ("train", "val", "test"):
        mine = [u for u, n in zip(items, names) if n == split and u.path in seconds]
        splits[split] = {"utterances": len(mine), "speakers": len({u.speaker for u in mine}),
                         "words": sum(len(u.text.split()) for u in mine),
                         "seconds": round(sum(seconds[u.path] for u in mine), 2),
                         "longest_s": round(max((seconds[u.path] for u in mine), default=0.0), 2)}
    warnings = [f"the {split} split is empty: `ldfleet train` needs speakers in train, val and test"
                for split, facts in splits.items() if not facts["utterances"]]
    warnings += corpus_warnings(items, names)
    warnings += _duration_warnings(items, seconds)
    if as_json:
        print(json.dumps({"root": str(root), "kind": "transcribed", "splits": splits, "skipped": skipped,
                          "warnings": warnings}, indent=2))
        return
    table = Table(title=f"{root} (transcribed speech)")
    for col in ("split", "utterances", "speakers", "words", "minutes", "longest (s)"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, facts in splits.items():
        table.add_row(split, *(str(facts[c]) for c in ("utterances", "speakers", "words")), f"{facts['seconds'] / 60:.1f}",
                      f"{facts['longest_s']:.1f}")
    console.print(table)
    for item in skipped:
        err.print(f"[yellow]skipped[/] {item['path']}: {item['reason']}")
    for warning in warnings:
        err.print(f"[yellow]warning[/]: {warning}")


#: A clip longer than this is far longer than training batches expect: it is trained in a batch of its own.
LONG_CLIP_S = 30.0


def _duration_warnings(items, seconds: dict) -> list[str]:
    """Clips over :data:`LONG_CLIP_S`, and manifest ``duration`` fields that disagree with the audio."""
    out = []
    long = [u for u in items if seconds.get(u.path, 0.0) > LONG_CLIP_S]
    if long:
        worst = max(long, key=lambda u: seconds[u.path])
        out.append(f"{len(long)} clip(s) longer than {LONG_CLIP_S:.0f} s (longest {worst.path.name}: {seconds[worst.path]:.0f} s): "
                   "each is trained and scored in a small batch of its own, slowly")
    wrong = []
    for u in items:
        try:
            stated = float(u.meta.get("duration", "nan"))
        except ValueError:
            stated = float("nan")
        if u.path in seconds and stated == stated and abs(stated - seconds[u.path]) > max(0.1, 0.05 * seconds[u.path]):
            wrong.append((u, stated))
    if wrong:
        u, stated = wrong[0]
        out.append(f"{len(wrong)} duration field(s) disagree with the audio (e.g. {u.path.name}: {stated:g} s stated, "
                   f"{seconds[u.path]:.2f} s read); the audio is what is used")
    return out


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the root CLI."""
    data_app = typer.Typer(
        name="data",
        help="Speech data: synthesize keyword or speech-recognition corpora with espeak-ng, inspect Speech Commands-layout folders.",
        no_args_is_help=True,
    )
    data_app.command("synth", help=SYNTH_HELP)(synth)
    data_app.command("info", help=INFO_HELP)(info)
    app.add_typer(data_app, name="data")
