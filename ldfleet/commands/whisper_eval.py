"""`ldfleet eval` for Whisper speech recognition: a pretrained checkpoint or a trained Whisper run."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ldfleet.commands._shared import console, err, fail


def audiofolder_for(data: Path, split: str) -> Path:
    """DATA/SPLIT when that is an audiofolder or manifest (Hugging Face's per-split folders), else DATA
    itself (every clip of it; with --split all, always DATA)."""
    from ldfleet.common.data.transcribed import is_transcribed

    for candidate in ((data / split, data) if split != "all" else (data,)):
        if candidate.exists() and is_transcribed(candidate):
            return candidate
    fail(f"{data} is not a Hugging Face audiofolder or manifest (no metadata.csv / manifest.jsonl in it or in {data / split})")


def eval_whisper(run: Path | None, backbone: str | None, data: Path, split: str, methods: list[str],
                 keeps: list[float], language: str, pad_to_window: bool, limit: int, batch_size: int,
                 as_json: bool, progress) -> None:
    """Evaluate every method at every keep ratio; prints a table or JSON rows."""
    from ldfleet.common.asr_eval import evaluate_asr
    from ldfleet.common.data.transcribed import load_speech_items
    from ldfleet.common.model.whisper_dynamic import WhisperDynamic

    folder = audiofolder_for(data, split)
    try:
        items = load_speech_items(folder, limit=limit or None)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    if not items:
        fail(f"{folder} has no clips")
    try:
        if run is not None:
            model = WhisperDynamic.load(run)
        else:
            model = WhisperDynamic.from_pretrained(backbone, language=language or None, pad_to_window=pad_to_window).eval()
    except (OSError, ValueError) as exc:
        fail(f"cannot load the model: {exc}")
    untrained = {"static", "selector"} & set(methods)
    if run is None and untrained:
        err.print(f"[yellow]note:[/] {', '.join(sorted(untrained))} untrained without --run (initial scores)")
    with progress() as p:
        task = p.add_task(f"eval {folder.name}", total=None)
        result = evaluate_asr(model, items, methods, keeps, batch_size=batch_size,
                              on_batch=lambda i, n: p.update(task, completed=i, total=n))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"{run or backbone} on {folder} ({len(items)} clips)")
    for col in ("method", "keep", "k", "WER", "CER", "mean layers", "encoder ms", "ms/clip", "layer sets"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in result.rows:
        table.add_row(r.method, f"{r.keep:.2f}", str(r.k), f"{100 * r.wer:.1f}%", f"{100 * r.cer:.1f}%",
                      f"{r.mean_layers:.2f}", f"{r.encoder_ms:.1f}", f"{r.ms_per_example:.1f}", str(r.distinct_layer_sets))
    console.print(table)
