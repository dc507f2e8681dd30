"""`ldfleet train`, `ldfleet eval`, `ldfleet bench speed`: the model side of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldfleet.commands._shared import bench_group, console, err, fail


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name} is empty")
    return values


def _keeps(text: str) -> list[float]:
    keeps = _floats(text, "--keep")
    bad = [k for k in keeps if not 0 < k <= 1]
    if bad:
        raise typer.BadParameter(f"keep ratios must be in (0, 1], got {bad}")
    return keeps


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    )


def _load_data(data: Path, seed: int):
    from ldfleet.common.data.folder import load_splits

    try:
        return load_splits(data, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        fail(f"cannot load data from {data}: {exc}")


def train(
    data: Path = typer.Option(..., "--data", help="Folder in Speech Commands layout (e.g. from `ldfleet data synth`)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, progress, config. Re-run to resume."),
    backbone: str = typer.Option("tiny", help="`tiny` or `base` (built in code), a hub id, or a local checkpoint folder."),
    family: str = typer.Option("wavlm", help="wavlm | hubert | wav2vec2 (for `tiny`/`base`)."),
    epochs: int = typer.Option(20, min=0, help="Epochs of backbone + head training under random layer dropping."),
    strategy_epochs: int = typer.Option(6, min=0, help="Epochs for each of early_exit, static and selector."),
    layerdrop: float = typer.Option(0.1, min=0.0, max=0.95, help="Stage-1 LayerDrop rate per layer and example (HF's default is 0.1)."),
    batch_size: int = typer.Option(32, min=1),
    seed: int = typer.Option(0, help="Seed for initialisation, data order, splits and augmentation."),
    threads: int = typer.Option(0, min=0, help="torch threads (0 = torch's default)."),
) -> None:
    """Train a dynamic model: backbone + head tolerant to dropped layers, then every strategy.

    Stage 1 tunes the backbone and head with random per-example layer dropping; stage 2 freezes
    the backbone and trains the early-exit head, the static mask and the input-conditioned
    selector. Checkpoints (safetensors) are written after every epoch; running the same command
    again resumes an interrupted run.
    """
    import torch

    from ldfleet.common.train import STAGES, TrainConfig, Trainer

    if threads:
        torch.set_num_threads(threads)
    splits = _load_data(data, seed)
    cfg = TrainConfig(backbone=backbone, family=family, epochs=epochs, strategy_epochs=strategy_epochs,
                      layerdrop=layerdrop, batch_size=batch_size, seed=seed)
    try:
        trainer = Trainer(out, splits["train"], splits["val"], cfg, log=console.print)
    except (OSError, ValueError) as exc:
        fail(f"cannot start training: {exc}")
    console.print(f"train {len(splits['train'])} clips, val {len(splits['val'])}, test {len(splits['test'])}; run {out}")
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_step(stage: str, step: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            if step == 1:
                progress.reset(tasks[stage], total=total)
            progress.update(tasks[stage], completed=step)

        state = trainer.fit(on_step)
    console.print(f"[green]done[/green]: stages {', '.join(STAGES)}; {len(state.history)} epochs logged in {out}/train_state.json")


def evaluate(
    run: Path = typer.Option(None, "--run", help="A run folder made by `ldfleet train` (or by `make real-bench`)."),
    data: Path = typer.Option(..., "--data", help="Speech Commands folder (kws; its test split, held-out speakers), "
                              "or a Hugging Face audiofolder (asr; DATA or DATA/SPLIT with metadata.csv)."),
    keep: str = typer.Option("0.25,0.5,0.75,1.0", help="Comma-separated keep ratios."),
    methods: str = typer.Option("full,random,early_exit,static,selector", help="Comma-separated strategies."),
    split: str = typer.Option("test", help="train | val | test"),
    seed: int = typer.Option(-1, help="Split seed (default: the run's training seed)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    backbone: str = typer.Option(None, "--backbone", help="asr without a run: a Whisper hub id or local HF folder "
                                 "(e.g. from `ldfleet model import`)."),
    task: str = typer.Option("", "--task", help="kws | asr (default: what the run was trained for; asr with --backbone)."),
    language: str = typer.Option("en", help="asr: language token Whisper's decoder is forced to ('' = detect)."),
    pad_to_window: bool = typer.Option(True, "--pad-to-window/--unpadded",
                                       help="asr with --backbone: pad clips to Whisper's 30 s window (default: the stock "
                                       "decoder loops on unpadded clips), or run them at their own length (~10x less encoder time)."),
    limit: int = typer.Option(0, min=0, help="asr: evaluate only the first N clips (0 = all)."),
    batch_size: int = typer.Option(8, min=1, help="asr: clips per encoder batch."),
) -> None:
    """Accuracy (kws) or WER/CER (asr), layers run and ms per example for every method at every keep ratio.

    asr: rows `method, keep, k, wer, cer, mean_layers, encoder_ms, ms_per_example, distinct_layer_sets`;
    `--backbone DIR` evaluates a pretrained Whisper with no run folder (full, random, early_exit).
    """
    from ldfleet.common.model.strategies import STRATEGY_NAMES

    keeps = _keeps(keep)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in STRATEGY_NAMES]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {', '.join(STRATEGY_NAMES)}")
    if (run is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --run and --backbone")
    from ldfleet.common.model.whisper_dynamic import is_whisper_run

    if backbone is not None or task == "asr" or is_whisper_run(run):
        if backbone is not None and task not in ("", "asr"):
            raise typer.BadParameter("--backbone evaluates speech recognition (--task asr)")
        from ldfleet.commands.whisper_eval import eval_whisper

        eval_whisper(run if backbone is None else None, backbone, data, split, names, keeps, language,
                     pad_to_window, limit, batch_size, as_json, _progress)
        return
    from ldfleet.common.evaluate import evaluate as run_eval
    from ldfleet.common.model.checkpoint import load_model, read_meta
    try:
        meta = read_meta(run)
    except FileNotFoundError as exc:
        fail(exc)
    if seed < 0:
        seed = meta.get("train_config", {}).get("seed", 0)
    splits = _load_data(data, seed)
    if split not in splits:
        raise typer.BadParameter(f"split must be one of {sorted(splits)}")
    model = load_model(run)
    with _progress() as progress:
        task = progress.add_task(f"eval {split}", total=None)
        result = run_eval(model, splits[split], names, keeps,
                          on_batch=lambda i, n: progress.update(task, completed=i, total=n))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"{run} on {split} ({result.rows[0].examples} clips)")
    for col in ("method", "keep", "k", "accuracy", "mean layers", "GMACs", "ms/example"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in result.rows:
        table.add_row(r.method, f"{r.keep:.2f}", str(r.k), f"{100 * r.accuracy:.1f}%", f"{r.mean_layers:.2f}",
                      f"{r.macs / 1e9:.3f}", f"{r.ms_per_example:.2f}")
    console.print(table)
    if "selector" in result.layer_usage:
        usage = Table(title="selector: share of inputs running each layer")
        usage.add_column("keep")
        for i in range(model.num_layers):
            usage.add_column(f"L{i}", justify="right")
        for k, shares in result.layer_usage["selector"].items():
            usage.add_row(f"{k:.2f}", *[f"{s:.2f}" for s in shares])
        console.print(usage)


def bench_speed(
    family: str = typer.Option("wavlm", help="wavlm | hubert | wav2vec2"),
    seconds: str = typer.Option("1,5", help="Input lengths in seconds, comma-separated."),
    keep: str = typer.Option("0.25,0.5,0.75,1.0", help="Keep ratios, comma-separated."),
    batch: str = typer.Option("1,8", help="Batch sizes, comma-separated."),
    repeats: int = typer.Option(7, min=1, help="Timed repeats per configuration (median is reported)."),
    size: str = typer.Option("base", help="Model size: base (768x12, the real architecture) or tiny."),
    threads: int = typer.Option(0, min=0, help="torch threads (0 = torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Time front end, encoder layers and selector at each keep ratio (random weights, no download)."""
    import torch

    from ldfleet.common.model.benchmark import bench_speed as run_bench

    if threads:
        torch.set_num_threads(threads)
    batches = [int(b) for b in _floats(batch, "--batch")]
    rows = run_bench(family, _floats(seconds, "--seconds"), _keeps(keep), batches, repeats, size)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table(title=f"{size} {family}: median of {repeats}, {torch.get_num_threads()} thread(s)")
    for col in ("seconds", "batch", "keep", "k", "front-end ms", "encoder ms", "selector ms", "total ms", "encoder / full"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r.seconds:g}", str(r.batch), f"{r.keep:.2f}", str(r.k), f"{r.front_end_ms:.1f}",
                      f"{r.encoder_ms:.1f}", f"{r.selector_ms:.2f}", f"{r.total_ms:.1f}", f"{r.encoder_ratio:.3f}")
    console.print(table)


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder (re-running resumes)."),
    data: Path = typer.Option(Path("data/kws"), "--data", help="Corpus folder; synthesized with espeak-ng if absent."),
    epochs: int = typer.Option(20, min=1, help="Stage-1 epochs."),
    strategy_epochs: int = typer.Option(6, min=1, help="Epochs per stage-2 strategy."),
    seed: int = typer.Option(0),
) -> None:
    """Synthesize a corpus (if needed), train every strategy, and evaluate them on held-out speakers."""
    from ldfleet.common.data.synth import METADATA, SynthConfig, synthesize_corpus

    if not (data / METADATA).exists():
        console.print(f"synthesizing a keyword corpus into {data} (espeak-ng)")
        synthesize_corpus(SynthConfig(out=data, seed=seed))
    train(data=data, out=out, backbone="tiny", family="wavlm", epochs=epochs, strategy_epochs=strategy_epochs,
          layerdrop=0.1, batch_size=32, seed=seed, threads=0)
    evaluate(run=out, data=data, keep="0.25,0.5,0.75,1.0", methods="full,random,early_exit,static,selector",
             split="test", seed=seed, as_json=False, backbone=None, task="", language="en", pad_to_window=False,
             limit=0, batch_size=8)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate)
    app.command("demo")(demo)
    bench_group(app).command("speed")(bench_speed)
