"""`ldfleet model import`: bring a pretrained checkpoint from another format into a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import typer

from ldfleet.commands._shared import console, fail

model_app = typer.Typer(help="Pretrained checkpoints: import from other formats.", no_args_is_help=True)


@model_app.command("import")
def import_model(
    src: Path = typer.Argument(..., help="A faster-whisper / CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json)."),
    out: Path = typer.Option(..., "--out", help="Hugging Face folder to write (weights, tokenizer, feature extractor)."),
    sha256: str = typer.Option("", "--sha256", help="Expected sha256 of model.bin; a mismatch is refused. "
                               "Known checkpoints (Whisper base) are checked against their pin anyway."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing non-empty --out."),
) -> None:
    """Convert a CTranslate2 Whisper model into a folder that `--backbone DIR` loads.

    The binary model.bin is parsed directly (no ctranslate2 package), fp16 weights become float32,
    fused attention matrices are split into HF's q/k/v projections. Unknown layouts, dtypes, variable
    names and checksum mismatches are refused with the reason.
    """
    from ldfleet.common.model.ct2_import import ImportError_, import_ct2

    if not src.is_dir():
        fail(f"{src} is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        fail(f"{out} exists and is not empty (pass --overwrite)")
    try:
        import_ct2(src, out, expected_sha256=sha256 or None, log=console.print)
    except (ImportError_, OSError) as exc:
        fail(f"cannot import {src}: {exc}")
    console.print(f"[green]done[/green]: use it with --backbone {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
