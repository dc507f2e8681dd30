"""`ldfleet train`, `ldfleet eval`, `ldfleet bench speed`: the model side of the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldfleet.commands._shared import bench_group, console, err, fail, finite
from ldfleet.commands.data import STRICT_HELP, load_data
from ldfleet.common.data.labels import LABEL_SETS_HELP


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


def _load_data(task: str, data: Path, seed: int, labels: str = "keywords", strict: bool = False):
    """Train/val/test of ``data`` for ``task``; every clip is checked (bad ones skipped, or --strict stops)."""
    from ldfleet.common.data.loading import keyword_task_data, load_task_data

    try:
        if task == "kws":
            return keyword_task_data(load_data(data, seed, strict), data, labels)
        return load_task_data(task, data, seed=seed, labels=labels, strict=strict)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        fail(f"cannot load data from {data} (task {task}): {exc}")


def _without_long_clips(dataset: Any, max_seconds: float) -> Any:
    """``dataset`` without its clips over ``max_seconds`` (said how many); data that do not know
    their lengths (keyword clips, 1 s each) are returned as they are."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        return dataset
    keep = [i for i, n in enumerate(lengths) if n <= max_seconds * 16000]
    if len(keep) < len(lengths):
        err.print(f"--max-seconds {max_seconds:g}: {len(lengths) - len(keep)} of {len(lengths)} training clips left out "
                  f"(the longest {max(lengths) / 16000:.1f} s)")
    return dataset.subset(keep)


def _task(task: str) -> str:
    if task not in ("kws", "asr"):
        raise typer.BadParameter(f"--task must be kws or asr, got {task!r}")
    return task


LABELS_HELP = "kws label set: " + LABEL_SETS_HELP + "."
#: --labels values that name a set rather than list one (their missing words are only warned about).
LABEL_PRESETS = ("", "keywords", "folder", "speech-commands-35")


# metadata columns of ``ldfleet data synth --task asr`` that eval reports layer usage by
CONDITIONS = ("snr_db", "channel", "voice", "speed")


def _speed_band(wpm: str) -> str:
    """espeak-ng words per minute -> slow (< 150) / medium / fast (> 190); '' when unknown."""
    try:
        v = float(wpm)
    except ValueError:
        return ""
    return "slow" if v < 150 else "fast" if v > 190 else "medium"


def _conditions(dataset) -> dict[str, list[str]] | None:
    """Condition columns of an asr test set (noise, channel, accent, speed band), when it has them."""
    if not hasattr(dataset, "conditions"):
        return None
    out = {c: dataset.conditions(c) for c in CONDITIONS}
    out["speed"] = [_speed_band(v) for v in out["speed"]]
    return {c: v for c, v in out.items() if any(v)} or None


def train(
    data: Path = typer.Option(..., "--data", help="kws: a Speech Commands-layout folder; asr: an audiofolder (metadata.csv) or a JSON-lines manifest."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, progress, config. Re-run to resume."),
    task: str = typer.Option("kws", help="kws (keyword classification) or asr (CTC speech recognition over characters or words)."),
    labels: str = typer.Option("keywords", help=LABELS_HELP),
    tokens: str = typer.Option("char", help="asr: CTC output units: char, or word (closed vocabularies only: every training word is a unit, any other word is <unk>; from scratch it learns slower here)."),
    backbone: str = typer.Option("tiny", help="`tiny` or `base` (built in code), a hub id, or a local checkpoint folder."),
    family: str = typer.Option("wavlm", help="wavlm | hubert | wav2vec2 (for `tiny`/`base`)."),
    epochs: Optional[int] = typer.Option(None, min=0, help="Stage-1 epochs (backbone + head under LayerDrop) \\[default: kws 20, asr 24].", show_default=False),
    strategy_epochs: Optional[int] = typer.Option(None, min=0, help="Epochs for each of early_exit, static and selector \\[default: kws 6, asr 4].", show_default=False),
    layerdrop: Optional[float] = typer.Option(None, min=0.0, max=0.95, help="Stage-1 LayerDrop rate per layer and example \\[default: 0.1, HF's].", show_default=False, callback=finite),
    batch_size: Optional[int] = typer.Option(None, min=1, help="\\[default: kws 32, asr 16]", show_default=False),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Backbone lr from scratch \\[default: kws 1e-3, asr 2e-3].", show_default=False, callback=finite),
    distill: Optional[float] = typer.Option(None, min=0.0, help="Stage-2 weight of KL distillation from the full model \\[default: kws 0, asr 1].", show_default=False, callback=finite),
    selector_budget: Optional[bool] = typer.Option(None, "--selector-budget/--no-selector-budget", help="Give the selector the budget k/L as an input (and static one ranking per k), so kept sets need not be nested \\[default: kws off, asr on].", show_default=False),
    oracle_weight: Optional[float] = typer.Option(None, min=0.0, help="Selector stage: weight of supervision by the per-batch oracle (best of 4 random layer sets per input) \\[default: 0].", show_default=False, callback=finite),
    set_table: Optional[int] = typer.Option(None, "--set-table", min=0, help="Fit static and selector on every layer set's loss over N training clips (and N/4 validation clips) instead of by straight-through gates: a per-k static takes each k's lowest-loss set, the selector starts from it; then --strategy-epochs train only their heads, on those sets (0: keep the base head) \\[default: kws 0 = gates, asr 512].", show_default=False),
    joint_epochs: Optional[int] = typer.Option(None, "--joint-epochs", min=0, help="Stage 3: epochs fine-tuning the shared encoder layers together with every strategy's head, each on the layer sets it runs (random: a random k-layer set per input; early exit: the first k; static, selector: their chosen sets; k drawn per batch); the front end and the scorers stay frozen. Given on a finished run, adds them (re-running without it keeps the run's own) \\[default: kws 0, asr 6; with --from-run 0].", show_default=False),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="Skip stage 1: train only the stage-2 strategies, with this command's options, on the backbone and base head of RUN (a finished stage 1 on the same data), e.g. to compare --selector-budget or --distill without training the encoder again (stage 3 runs only when --joint-epochs is given).", show_default=False),
    depth_clips: Optional[int] = typer.Option(None, "--depth-clips", min=0, help="Stage 4: fit the `adaptive` strategy's depth chooser (a depth per input at a mean of k layers, its layers the selector's) on the selector's errors at every depth over N training clips, calibrated on the validation clips (on the default asr corpus: under 7 minutes on 2 cores), and calibrate `confident_exit` (early exit at the first confident exit, a mean of k layers) on the validation clips. Given on a finished run, fits what is not fitted (0: no stage 4) \\[default: kws 0, asr 4096; a resumed run keeps its own].", show_default=False),
    seed: int = typer.Option(0, help="Seed for initialisation, data order, splits and augmentation."),
    threads: int = typer.Option(0, min=0, help="torch threads (0 = torch's default)."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    max_seconds: float = typer.Option(0.0, "--max-seconds", min=0.0, help="asr: leave training clips longer than this "
                                      "out (0: keep all); validation and test keep theirs. A long clip trains in a small "
                                      "batch of its own, slowly.", callback=finite),
) -> None:
    """Train a dynamic model: backbone + head tolerant to dropped layers, then every strategy.

    Stage 1 tunes the backbone and the task head (label classes, or CTC over characters or words) with random
    per-example layer dropping; stage 2 freezes the backbone and trains the early-exit head, the
    static mask and the input-conditioned selector; stage 3 (--joint-epochs) fine-tunes the encoder layers
    with every strategy on its own layer sets; stage 4 (--depth-clips) fits the depth chooser of `adaptive`,
    the selector with a depth per input, and calibrates `confident_exit`. Checkpoints (safetensors) are written after every epoch;
    running the same command again resumes an interrupted run.
    """
    import torch

    from ldfleet.common.train import config_for
    from ldfleet.common.trainer import Trainer, saved_progress, source_progress

    if threads:
        torch.set_num_threads(threads)
    try:  # options that contradict each other are refused before any data is read
        config_for(_task(task), set_table=set_table, oracle_weight=oracle_weight)
        saved = saved_progress(out)  # a damaged run folder is refused before the data is read
        if from_run and saved is None:  # a resumed run no longer reads its source
            source_progress(from_run)
    except ValueError as exc:
        fail(exc)
    if saved is not None:  # the splits come from the command line: they must be the run's own, or test clips leak in
        for name, given in (("task", _task(task)), ("seed", seed), ("max_seconds", max_seconds)):
            if saved[0].get(name, given) != given:
                flag = "--" + name.replace("_", "-")
                fail(f"{out} was trained with {flag} {saved[0][name]}: give {flag} {saved[0][name]} to resume it")
        if "max_seconds" not in saved[0] and max_seconds > 0:  # a run from before the cap was recorded
            err.print(f"[yellow]warning[/]: {out} does not record the --max-seconds it was trained with: resumed with "
                      f"another, it trains on other clips")
    task_data = _load_data(task, data, seed, labels, strict)
    splits = task_data.splits
    if max_seconds > 0:
        splits["train"] = _without_long_clips(splits["train"], max_seconds)
    listed = task_data.labels and labels not in LABEL_PRESETS  # a class listed by hand may be a typo
    if listed:
        anywhere = {t for ds in splits.values() for t in ds.texts}
        absent = [label for label in task_data.labels if label not in anywhere]
        if absent:
            fail(f"label(s) {absent} have no clips in {data} (`ldfleet data info {data}` shows the words; word folders "
                 "are matched exactly, case included)")
    for name in ("train", "val"):  # a split drawn by speaker can come out empty in a corpus of few speakers
        if not len(splits[name]):
            fail(f"{data} has no {name} clips (`ldfleet data info {data}` shows the splits): training needs clips in "
                 "train and val. Without a split column, whole speakers are drawn into train/val/test, so the corpus "
                 "needs several speakers; with one, give some rows the split 'validation' (or per-split folders)")
    if not len(splits["test"]):
        err.print(f"[yellow]warning[/]: {data} has no test clips: `ldfleet eval` will have nothing to score")
    if listed:  # a class with clips, none of them in train, cannot be learned
        trained = set(splits["train"].texts)
        untrained = [label for label in task_data.labels if label not in trained]
        if untrained:
            fail(f"label(s) {untrained} have no train clips in {data}: their speakers all fell into val or test")
    cfg = config_for(task, backbone=backbone, family=family, epochs=epochs, strategy_epochs=strategy_epochs,
                     layerdrop=layerdrop, batch_size=batch_size, lr=lr, distill=distill, selector_budget=selector_budget, oracle_weight=oracle_weight, seed=seed,
                     labels=list(task_data.labels) if task_data.labels else None, tokens=tokens,
                     from_run=str(from_run) if from_run else None, set_table=set_table, joint_epochs=joint_epochs,
                     depth_clips=depth_clips, max_seconds=max_seconds)
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
    stages = dict.fromkeys(h["stage"] for h in state.history)  # with epochs or fits, in order (--from-run: the source's too)
    console.print(f"[green]done[/green]: stages {', '.join(stages)}; {len(state.history)} epochs and fits logged in {out}/train_state.json")
    _warn_if_blank(state.history)


#: Validation WER at or above which a CTC run is taken to transcribe (almost) nothing.
BLANK_WER = 0.98


def _warn_if_blank(history: list[dict]) -> None:
    """Warn when stage 1 of a speech-recognition run ended still on the CTC blank plateau (a model that
    outputs only blanks scores WER 1.0): every later stage and every figure is then meaningless."""
    stage1 = [h for h in history if h.get("stage") == "backbone" and h.get("val_wer") is not None]
    if stage1 and stage1[-1]["val_wer"] >= BLANK_WER:
        err.print(f"[yellow]warning[/]: validation WER is {stage1[-1]['val_wer']:.2f} after {len(stage1)} stage-1 epoch(s): "
                  "the model still transcribes almost nothing. A CTC model first learns to output only blanks and leaves "
                  "that plateau only with enough data and steps: train longer (--epochs), on more speakers or utterances "
                  "(`data synth --task asr` defaults: 6 480), or check the transcriptions", soft_wrap=True)


EVAL_METHODS = "full,random,early_exit,static,selector,adaptive,confident_exit,oracle"
DEPTH_METHODS = {"adaptive", "confident_exit"}  # a mean of k layers, fitted in the depth stage (stage 4)


def evaluate(
    run: Path = typer.Option(None, "--run", help="A run folder made by `ldfleet train` or `make real-bench` (its task and labels are used)."),
    data: Path = typer.Option(..., "--data", help="kws: Speech Commands folder; asr: audiofolder or manifest (DATA or DATA/SPLIT for --backbone). Its test split (--split) is used: held-out speakers, or the rows a split column marks test."),
    keep: str = typer.Option("0.25,0.5,0.75,1.0", help="Comma-separated keep ratios."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods; oracle also adds oracle_static. adaptive "
                                          "(the selector with a depth per input at a duration-weighted mean of k layers) and "
                                          "confident_exit (early exit at the first exit confident enough for that mean) need "
                                          "a run whose stage 4 fitted them; by default they are left out where none is "
                                          f"\\[default: {EVAL_METHODS}].", show_default=False),
    split: str = typer.Option("test", help="train | val | test | all (every clip of --data: for a corpus the run was not trained on)."),
    seed: int = typer.Option(-1, help="Split seed (default: the run's training seed)."),
    oracle_sets: int = typer.Option(16, min=1, help="Candidate layer sets per budget for the oracle rows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    backbone: str = typer.Option(None, "--backbone", help="asr without a run: a Whisper hub id or local HF folder "
                                 "(e.g. from `ldfleet model import`)."),
    task: str = typer.Option("", "--task", help="kws | asr (default: what the run was trained for; asr with --backbone)."),
    language: str = typer.Option("en", help="Whisper: language token the decoder is forced to ('' = detect)."),
    pad_to_window: bool = typer.Option(True, "--pad-to-window/--unpadded",
                                       help="Whisper with --backbone: pad clips to the 30 s window (default: the stock "
                                       "decoder loops on unpadded clips), or run them at their own length (~10x less encoder time)."),
    limit: int = typer.Option(0, min=0, help="Evaluate only the first N clips of the split (0 = all): a quick look, not a figure to report."),
    batch_size: int = typer.Option(8, min=1, help="Whisper: clips per encoder batch."),
) -> None:
    """Accuracy (kws) or WER/CER (asr), layers run, MACs and ms per example for every method at every keep ratio.

    The oracle rows bound what input conditioning can win: per input, the best of --oracle-sets
    random layer sets (oracle) against the best single one of them for all inputs (oracle_static);
    `headroom` (JSON) and its table give the gain between them and the share the selector took.
    Whisper (`--backbone DIR --task asr`, or a Whisper run): rows `method, keep, k, wer, cer,
    mean_layers, encoder_ms, ms_per_example, distinct_layer_sets`; no oracle rows.
    """
    from ldfleet.common.evaluate import ORACLE_METHODS, evaluate as run_eval
    from ldfleet.common.model.checkpoint import head_spec_of, load_model, read_meta
    from ldfleet.common.model.strategies import STRATEGY_NAMES

    keeps = _keeps(keep)
    names = [m.strip() for m in (methods or EVAL_METHODS).split(",") if m.strip()]
    unknown = [m for m in names if m not in STRATEGY_NAMES + ORACLE_METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {', '.join(STRATEGY_NAMES + ORACLE_METHODS)}")
    if (run is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --run and --backbone")
    if backbone is not None and task not in ("", "asr"):
        raise typer.BadParameter("--backbone evaluates speech recognition (--task asr)")
    from ldfleet.common.model.whisper_dynamic import is_whisper_run

    if backbone is not None or is_whisper_run(run):
        from ldfleet.commands.whisper_eval import eval_whisper

        if DEPTH_METHODS & set(names) and methods is not None:
            raise typer.BadParameter("adaptive and confident_exit are not fitted for Whisper: leave them out of --methods")
        eval_whisper(run if backbone is None else None, backbone, data, split, [m for m in names if m in STRATEGY_NAMES and m not in DEPTH_METHODS],
                     keeps, language, pad_to_window, limit, batch_size, as_json, _progress)
        return
    try:
        meta = read_meta(run)
    except FileNotFoundError as exc:
        fail(exc)
    if seed < 0:
        seed = meta.get("train_config", {}).get("seed", 0)
    spec = head_spec_of(meta)
    run_task = "asr" if spec["type"] != "classification" else "kws"
    if task and task != run_task:
        raise typer.BadParameter(f"--task {task}, but {run} was trained for {run_task}")
    task = run_task
    labels = ",".join(spec["labels"]) if task == "kws" else "keywords"
    if split not in ("train", "val", "test", "all"):
        raise typer.BadParameter(f"--split must be train, val, test or all, got {split!r}")
    splits = _load_data(task, data, seed, labels, strict).splits
    dataset = splits[split] if split != "all" else type(splits["test"]).join([splits[s] for s in ("train", "val", "test")])
    if len(dataset) == 0:
        hint = "" if split == "all" else (" (whole speakers are drawn into train/val/test unless a split column says: "
                                          "--split all scores every clip of a corpus the run was not trained on)")
        fail(f"the {split} split of {data} is empty{hint}")
    if 0 < limit < len(dataset):
        err.print(f"note: evaluating the first {limit} of the {len(dataset)} clips of {split} (--limit)")
        dataset = dataset.subset(range(limit))
    conditions = _conditions(dataset)
    model = load_model(run)
    fitted = {"adaptive": model.strategy("adaptive").chooser.is_fitted, "confident_exit": model.strategy("confident_exit").is_fitted}
    for method in [m for m in names if m in DEPTH_METHODS and not fitted[m]]:
        if methods is not None:
            train_cfg = meta.get("train_config", {})
            fail(f"{run} has no fitted {method}: `ldfleet train --task {task} --data {data} --out {run} "
                 f"--seed {train_cfg.get('seed', 0)}{' --labels ' + labels if task == 'kws' else ''} --depth-clips 4096` fits it "
                 f"on the finished run (stage 4), or leave {method} out of --methods")
        names.remove(method)
        err.print(f"note: no {method} rows ({run} has no depth stage for it; see `ldfleet train --help`, --depth-clips)")
    with _progress() as progress:
        bar = progress.add_task(f"eval {split}", total=None)
        result = run_eval(model, dataset, names, keeps, oracle_sets=oracle_sets, conditions=conditions,
                          on_batch=lambda i, n: progress.update(bar, completed=i, total=n))
    if as_json:
        print(json.dumps({"run": str(run), "data": str(data), "split": split, "limit": limit or None, **result.as_dict()}, indent=2))
        return
    metrics = ("accuracy",) if task == "kws" else ("wer", "cer")
    table = Table(title=f"{run} on {split} ({result.rows[0].examples} clips)")
    for col in ("method", "keep", "k", *metrics, "mean layers", "by duration", "distinct sets", "GMACs", "ms/example"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in result.rows:
        ms = "-" if r.ms_per_example is None else f"{r.ms_per_example:.2f}"
        table.add_row(r.method, f"{r.keep:.2f}", str(r.k), *(f"{100 * r.scores[m]:.1f}%" for m in metrics),
                      f"{r.mean_layers:.2f}", f"{r.mean_layers_timed:.2f}", str(r.distinct_sets), f"{r.macs / 1e9:.3f}", ms)
    console.print(table)
    headroom = result.headroom()
    if headroom:
        unit = "WER" if task != "kws" else "error"
        room = Table(title=f"what input conditioning could win ({unit}): best single set vs per-input oracle")
        for col in ("keep", "best single set", "oracle", "headroom", "selector", "selector captured"):
            room.add_column(col, justify="right")
        for h in headroom:
            sel = "-" if h["selector"] is None else f"{100 * h['selector']:.1f}%"
            cap = "-" if h["captured"] is None else f"{100 * h['captured']:.0f}%"
            room.add_row(f"{h['keep']:.2f}", f"{100 * h['best_single']:.1f}%", f"{100 * h['oracle']:.1f}%",
                         f"{100 * h['headroom']:.0f}%", sel, cap)
        console.print(room)
        columns = sorted({c for h in headroom for c in h["by_condition"]})
        if columns:
            cond = Table(title=f"{unit} of the best set per value of one condition (a selector that sees only it)")
            for col in ("keep", "best single set", *columns, "oracle"):
                cond.add_column(col, justify="right")
            for h in headroom:
                cond.add_row(f"{h['keep']:.2f}", f"{100 * h['best_single']:.1f}%",
                             *(f"{100 * h['by_condition'][c]:.1f}%" for c in columns), f"{100 * h['oracle']:.1f}%")
            console.print(cond)
    if "selector" in result.layer_usage:
        usage = Table(title="selector: share of inputs running each layer")
        usage.add_column("keep")
        for i in range(model.num_layers):
            usage.add_column(f"L{i}", justify="right")
        for k, shares in result.layer_usage["selector"].items():
            usage.add_row(f"{k:.2f}", *[f"{s:.2f}" for s in shares])
        console.print(usage)
    for k, by_column in result.usage_by_condition.get("selector", {}).items():
        table = Table(title=f"selector at keep {k:.2f}: share of inputs running each layer, by condition")
        table.add_column("condition")
        for i in range(model.num_layers):
            table.add_column(f"L{i}", justify="right")
        for column, per_value in by_column.items():
            for value, shares in per_value.items():
                table.add_row(f"{column}={value or 'none'}", *[f"{s:.2f}" for s in shares])
        console.print(table)


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
    train(data=data, out=out, task="kws", labels="keywords", backbone="tiny", family="wavlm", epochs=epochs,
          strategy_epochs=strategy_epochs, layerdrop=0.1, batch_size=32, lr=None, distill=None, selector_budget=None,
          oracle_weight=None, set_table=None, joint_epochs=None, from_run=None, depth_clips=None, seed=seed, threads=0,
          strict=False)
    evaluate(run=out, data=data, keep="0.25,0.5,0.75,1.0", methods="full,random,early_exit,static,selector",
             split="test", seed=seed, oracle_sets=16, as_json=False, strict=False, backbone=None, task="",
             language="en", pad_to_window=True, limit=0, batch_size=8)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate)
    app.command("demo")(demo)
    bench_group(app).command("speed")(bench_speed)
