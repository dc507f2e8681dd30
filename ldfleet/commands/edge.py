"""The device's inference side: `ldfleet infer`, `ldfleet export`, `ldfleet serve`, `ldfleet bench runtime|serve`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ldfleet.commands._shared import bench_group, console, err, fail, finite, open_registry, run_registry

RUNTIME_HELP = "torch (a run folder) | onnx | onnx-int8 (an export folder from `ldfleet export`)."
_KEEP = typer.Option(None, "--keep", help="Fixed keep ratio in (0, 1] (share of encoder layers), instead of the device's policy.")
_LATENCY = typer.Option(None, "--latency-ms", help="Latency target per input in ms: the governor lowers k to meet it.")
_RTF = typer.Option(None, "--rtf", help="Real-time factor target: ms of compute per ms of audio (0.05: a 4 s utterance "
                    "in 200 ms); the governor lowers k to meet it. For speech recognition, whose inputs differ in length.")
_DEVICE = typer.Option(None, "--device-id", help="Device whose agent state holds the policy (default: the host name).")
_STATE = typer.Option(None, "--state-dir", help="Agent state dir (default: $LDFLEET_HOME/devices/DEVICE_ID).")
_THREADS = typer.Option(1, "--threads", min=0, help="Compute threads of the runtime (0: its default).")
_STRATEGY = typer.Option("selector", "--strategy", help="selector: exactly k layers per input; adaptive: a depth per input "
                         "at a duration-weighted mean of k (needs the run's depth stage).")


def _wav_inputs(inputs: list[str]) -> list[str]:
    """Files as given, folders expanded to their audio files (sorted, recursive; dot files left out), '-' kept."""
    if inputs.count("-") > 1:
        fail("- (one WAV file on stdin) can be given once")
    out = []
    for item in inputs:
        path = Path(item)
        if item == "-":
            out.append(item)
        elif path.is_dir():
            from ldfleet.common.data.validate import AUDIO_SUFFIXES, is_candidate

            wavs = sorted(str(p) for p in path.rglob("*") if is_candidate(p))
            if not wavs:
                fail(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {item}")
            out.extend(wavs)
        elif path.is_file():
            out.append(item)
        elif path.exists():  # a device, a pipe, a socket
            fail(f"not a regular file: {item} (give an audio file, a folder of them, or - for stdin)")
        else:
            fail(f"no such file or folder: {item}")
    return out


def _warn_if_unfinished(run: Path) -> None:
    """A warning on stderr when ``run`` is a run folder whose training has not finished (its
    ``train_state.json`` says ``done: false``): its strategies may still be untrained."""
    try:
        state = json.loads((run / "train_state.json").read_text())
    except (OSError, ValueError):
        return  # an export folder, or a run saved without training state
    if isinstance(state, dict) and state.get("done") is False:
        err.print(f"[yellow]warning[/]: {run} has not finished training (stage {state.get('stage')}, epoch "
                  f"{state.get('epoch')}): re-run `ldfleet train` on it to finish")


def _session(run: Path, runtime: str, keep, latency_ms, rtf, device_id, state_dir, threads: int, strategy: str = "selector"):
    """The inference session of infer and serve: fixed --keep (a ceiling k) and/or one target
    (--latency-ms or --rtf), else the policy in the agent's state dir."""
    from ldfleet.client.infer import InferenceSession, PolicySource, open_engine
    from ldfleet.client.profile import default_device_id
    from ldfleet.common.budget import budget_text, check_budget
    from ldfleet.common.runtime import default_device_state_dir

    if latency_ms is not None and rtf is not None:
        fail("give one target: --latency-ms (per input) or --rtf (per second of audio)")
    for option, name, value in (("--keep", "keep", keep), ("--latency-ms", "latency_ms", latency_ms), ("--rtf", "rtf", rtf)):
        try:
            if value is not None:
                check_budget(**{name: value})  # the ranges `budget set` and the policy document enforce; NaN refused
        except ValueError as exc:
            fail(f"{option}: {exc}")
    _warn_if_unfinished(run)
    try:
        engine = open_engine(run, runtime, threads, strategy)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    fixed = keep is not None or latency_ms is not None or rtf is not None
    if not fixed:
        state_dir = state_dir or default_device_state_dir(device_id or default_device_id())
        from ldfleet.client.state import STATE_FILE

        if not (Path(state_dir) / STATE_FILE).is_file():
            err.print(f"[yellow]warning:[/] no device state in {state_dir} (no agent has run as "
                      f"{device_id or default_device_id()!r} here): every layer runs; give --device-id / --state-dir "
                      "of the device's agent, or --keep / --latency-ms / --rtf", soft_wrap=True)
    policy = PolicySource(engine.num_layers, None if fixed else state_dir, keep, latency_ms, rtf)
    p = policy.current()
    target = "" if p.latency_ms is None and p.rtf is None else ", target " + budget_text(None, p.latency_ms, p.rtf)
    err.print(f"policy: k={p.k}/{engine.num_layers} ({p.source}" + (f", version {p.version}" if p.version else "")
              + f"{target}); runtime {runtime}, strategy {strategy}")
    session = InferenceSession(engine, policy)
    session.warm_up()  # the first request is then planned, and not slowed by the runtime's first calls
    return session


def infer(
    inputs: list[str] = typer.Argument(..., help="Audio files (WAV, FLAC, OGG, MP3), folders (every audio file inside), or - for one file on stdin."),
    run: Path = typer.Option(..., "--run", help="Run folder (torch) or ONNX export folder (--runtime onnx)."),
    runtime: str = typer.Option("torch", "--runtime", help=RUNTIME_HELP),
    keep: Optional[float] = _KEEP,
    latency_ms: Optional[float] = _LATENCY,
    rtf: Optional[float] = _RTF,
    device_id: Optional[str] = _DEVICE,
    state_dir: Optional[Path] = _STATE,
    threads: int = _THREADS,
    strategy: str = _STRATEGY,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input and line: input, k, layers, ms, prediction, governor, target_ms."),
) -> None:
    """Run the model on audio as the device would: policy k (or --keep / --latency-ms / --rtf), governor, selector.

    Without --keep / --latency-ms / --rtf the policy is the one the device's agent keeps in its state dir
    (full model when there is none). Each input is resampled to 16 kHz mono and read as the run's task
    was trained: a keyword model gets it trimmed and centred in 1 s and answers a label; a speech-
    recognition (CTC) model gets the whole utterance and answers its transcript. Prints a table, or
    JSON lines with --json.
    """
    from ldfleet.client.infer import input_from_wav

    session = _session(run, runtime, keep, latency_ms, rtf, device_id, state_dir, threads, strategy)
    task = getattr(session.engine, "task", "kws")
    rows, failed = [], 0
    for item in _wav_inputs(inputs):
        try:
            wave = input_from_wav(sys.stdin.buffer.read() if item == "-" else item, task)
        except ValueError as exc:
            err.print(f"[red]skipped[/] {item}: {exc}")
            failed += 1
            continue
        try:
            result, decision, _policy = session.infer(wave)
        except Exception as exc:  # noqa: BLE001 - the runtime failed on this input: skip it, run the others
            err.print(f"[red]skipped[/] {item}: inference failed: {exc}")
            failed += 1
            continue
        row = {"input": item, "k": result.k, "layers": result.layers, "ms": round(result.ms, 3),
               "prediction": result.prediction, "governor": decision.explain(),
               "target_ms": None if decision.target_ms is None else round(decision.target_ms, 3)}
        if as_json:
            print(json.dumps(row), flush=True)
        rows.append(row)
    if not as_json and rows:
        table = Table(title=f"{len(rows)} input(s), {runtime}")
        for col in ("input", "prediction", "k", "layers", "ms", "governor"):
            table.add_column(col, justify="right" if col in ("k", "ms") else "left")
        for r in rows:
            table.add_row(r["input"], r["prediction"], str(r["k"]), ",".join(map(str, r["layers"])), f"{r['ms']:.1f}", r["governor"])
        console.print(table)
    if failed:
        raise typer.Exit(1)


def export(
    run: Path = typer.Argument(..., help="Run folder made by `ldfleet train`."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    out: Path = typer.Option(..., "--out", help="Folder for the graphs, manifest.json and edge_runtime.py."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write int8 (dynamic, MatMul) graphs of the layers and head."),
) -> None:
    """Export a run as ONNX graphs (front end, each encoder layer, selector, head, and the adaptive
    depth chooser when the run has one) for onnxruntime; keyword and CTC speech-recognition runs.

    A board needs only `pip install numpy onnxruntime` and the folder:
    `python3 OUT/edge_runtime.py OUT clip.wav --keep 0.5`. The fp32 graphs are checked against torch
    at every k before the command returns (largest logit difference in manifest.json).
    """
    if fmt != "onnx":
        fail(f"unknown format {fmt!r}: only onnx is supported")
    from ldfleet.common.model.export import export_onnx

    _warn_if_unfinished(run)
    try:
        manifest = export_onnx(run, out, int8=int8, on_step=lambda m: err.print(f"export: {m}"))
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    diff = manifest["max_abs_diff_fp32"]
    console.print(f"[green]exported[/] {manifest['num_layers']} layers to {out} "
                  f"({', '.join(manifest['graphs'])}); max |torch - onnx| = {diff:.2e}")
    if diff > 1e-4:
        fail(f"fp32 graphs differ from torch by {diff:.2e} > 1e-4", code=1)


def serve(
    run: Path = typer.Option(..., "--run", help="Run folder (torch) or ONNX export folder (--runtime onnx)."),
    runtime: str = typer.Option("onnx", "--runtime", help=RUNTIME_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    keep: Optional[float] = _KEEP,
    latency_ms: Optional[float] = _LATENCY,
    rtf: Optional[float] = _RTF,
    device_id: Optional[str] = _DEVICE,
    state_dir: Optional[Path] = _STATE,
    threads: int = _THREADS,
    strategy: str = _STRATEGY,
    max_bytes: int = typer.Option(1 << 20, "--max-bytes", min=1024, help="Largest request body accepted (413 above)."),
    max_seconds: float = typer.Option(10.0, "--max-seconds", min=0.1, max=600.0, help="Longest audio accepted per request, in seconds (422 above).", callback=finite),
    broker: Optional[str] = typer.Option(None, "--broker", help="MQTT broker for inference telemetry (default: LDFLEET_BROKER / running broker)."),
    telemetry_interval: float = typer.Option(10.0, "--telemetry-interval", min=0.0, help="Seconds between telemetry messages (0: none).", callback=finite),
) -> None:
    """HTTP inference service: POST /v1/infer (WAV body), GET /v1/health, GET /metrics (Prometheus).

    A keyword run answers a label, a speech-recognition (CTC) run a transcript of the whole utterance
    (up to --max-seconds). The device's policy is read per request from the agent's state dir, so a
    new policy version applies from the next request on without a restart. Bad requests get a clear 4xx.
    """
    from aiohttp import web

    from ldfleet.client.profile import default_device_id
    from ldfleet.client.serve import build_app
    from ldfleet.client.telemetry import TelemetryPublisher
    from ldfleet.common.runtime import default_broker_url

    session = _session(run, runtime, keep, latency_ms, rtf, device_id, state_dir, threads, strategy)
    publisher = None
    if telemetry_interval > 0:
        did = device_id or default_device_id()
        publisher = TelemetryPublisher(did, broker or default_broker_url(), session.stats, telemetry_interval).start()
        err.print(f"telemetry every {telemetry_interval:g} s as {did}")
    try:
        web.run_app(build_app(session, max_bytes=max_bytes, max_seconds=max_seconds), host=host, port=port, access_log=None,
                    print=lambda m: err.print(m.strip()))
    except (OSError, UnicodeError) as exc:  # binding the socket: the port is taken, the address is not this host's or no name
        fail(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc} (choose another --port or --host)")
    finally:
        if publisher is not None:
            publisher.stop()


def bench_runtime(
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder (default: a small model trained once and cached)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Corpus with held-out clips (needed with --run): a keyword folder, or an audiofolder / manifest for a speech-recognition run."),
    keep: str = typer.Option("0.25,0.5,1.0", "--keep", help="Keep ratios for the runtime comparison."),
    clips: int = typer.Option(150, "--clips", min=10, help="Held-out clips per runtime and keep."),
    requests: int = typer.Option(300, "--requests", min=30, help="Requests in each load-step stream."),
    target_ms: Optional[float] = typer.Option(None, "--target-ms", min=0.001, help="Latency target in ms (default: --target-factor x unloaded p50).", callback=finite),
    target_factor: float = typer.Option(1.5, "--target-factor", min=1.0, callback=finite),
    load_runtime: str = typer.Option("onnx", "--load-runtime", help="Runtime of the load step: " + RUNTIME_HELP),
    threads: int = _THREADS,
    strategy: str = _STRATEGY,
    as_json: bool = typer.Option(False, "--json", help="One JSON object: runtimes, load_step, conditions."),
) -> None:
    """Torch eager vs onnxruntime fp32 vs int8 (batch 1) and the governor vs a fixed k under a load step.

    Accuracy for a keyword run; WER and CER on held-out utterances for a speech-recognition run."""
    import os

    from ldfleet.common.runtime import ldfleet_home
    from ldfleet.simulations import bench_runtime as B

    say = (lambda m: err.print(m))
    if run is not None and data is None:
        fail("--run needs --data (the corpus whose held-out clips are used)")
    try:
        if run is None:
            run, data = B.default_model(ldfleet_home() / "cache" / "bench-runtime", say)
        export_dir = B.ensure_export(run, run / "onnx", say)
        test = B.test_clips(data, clips)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    keeps = [float(k) for k in keep.split(",") if k.strip()]
    load_before = os.getloadavg()
    try:
        rows = B.bench_runtimes(run, export_dir, test, keeps, threads, log=say, strategy=strategy)
    except ValueError as exc:  # a strategy the run cannot run
        fail(exc)
    steps = B.bench_load_step(export_dir if load_runtime != "torch" else run, test, load_runtime, requests, target_ms,
                              target_factor, threads=threads, log=say, strategy=strategy)
    conditions = {"strategy": strategy, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "threads": threads,
                  "cpu_count": os.cpu_count(), "clips": len(test), "run": str(run), "load_runtime": load_runtime}
    if as_json:
        print(json.dumps(B.as_json(rows, steps, conditions), indent=1))
        return
    asr = rows[0].accuracy is None  # a speech-recognition model: WER instead of accuracy
    quality = "WER" if asr else "accuracy"

    def percent(row) -> str:
        return f"{100 * (row.wer if asr else row.accuracy):.1f}%"

    table = Table(title=f"runtimes, batch 1, {len(test)} clips, {threads} thread(s), loadavg {load_before[0]:.2f}")
    for col in ("runtime", "keep", "k", "mean layers", "p50 ms", "p99 ms", quality, "speed-up p50"):
        table.add_column(col, justify="right")
    ref = {r.keep: r.ms_p50 for r in rows if r.runtime == "torch"}
    for r in rows:
        table.add_row(r.runtime, f"{r.keep:.2f}", str(r.k), f"{r.mean_layers:.2f}", f"{r.ms_p50:.2f}", f"{r.ms_p99:.2f}",
                      percent(r), f"{ref[r.keep] / r.ms_p50:.2f}x")
    console.print(table)
    table = Table(title=f"load step ({load_runtime}): spinning processes for the middle third")
    for col in ("mode", "target ms", "p50 ms", "p99 ms", "miss rate", quality, "mean k", "interventions"):
        table.add_column(col, justify="right")
    for s in steps:
        target = f"{s.target_ms:.1f}" + (f" (RTF {s.rtf:.4f})" if s.rtf is not None else "")  # governor_rtf: the mean
        table.add_row(s.mode, target, f"{s.p50_ms:.1f}", f"{s.p99_ms:.1f}", f"{100 * s.miss_rate:.1f}%",
                      percent(s), f"{s.mean_k:.2f}", str(s.interventions))
    console.print(table)


def bench_serve(
    run: Optional[Path] = typer.Option(None, "--run", help="Export folder (onnx) or run folder (torch) \\[default: the cached bench model]."),
    runtime: str = typer.Option("onnx", "--runtime", help=RUNTIME_HELP),
    requests: int = typer.Option(1000, "--requests", min=10, help="Requests to send."),
    concurrency: int = typer.Option(200, "--concurrency", min=1, help="Most requests in flight at once."),
    keep_after: float = typer.Option(0.5, "--keep-after", min=0.01, max=1.0, help="Keep ratio of the policy written halfway.", callback=finite),
    threads: int = _THREADS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """`ldfleet serve` on loopback under a bounded concurrent load, with a policy change halfway."""
    import os
    import tempfile

    from ldfleet.common.runtime import ldfleet_home
    from ldfleet.simulations import bench_runtime as B
    from ldfleet.simulations.bench_serve import as_dict
    from ldfleet.simulations.bench_serve import bench_serve as run_bench

    say = (lambda m: err.print(m))
    model, data = B.default_model(ldfleet_home() / "cache" / "bench-runtime", say)
    target = run or (B.ensure_export(model, model / "onnx", say) if runtime != "torch" else model)
    clips = [w for w, _ in B.test_clips(data, 50)]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ldfleet-bench-serve-") as state:
        try:
            row = run_bench(target, clips, Path(state), runtime, requests, concurrency, 1.0, keep_after, threads)
        except (FileNotFoundError, ValueError) as exc:
            fail(exc)
    out = {**as_dict(row), "loadavg_before": load, "loadavg_after": os.getloadavg(), "runtime": runtime}
    if as_json:
        print(json.dumps(out, indent=1))
        return
    table = Table(title=f"serve: {requests} requests, {concurrency} in flight, {runtime}, loadavg {load[0]:.2f}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in out.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console.print(table)
    if row.errors or row.lost or row.stale_after_change:
        fail(f"{row.errors} error(s), {row.lost} lost, {row.stale_after_change} stale answer(s)", code=1)


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
    app.command("export")(export)
    app.command("serve")(serve)
    bench_group(app).command("runtime")(bench_runtime)
    bench_group(app).command("serve")(bench_serve)


def inference_usage(run: Optional[Path], db: Optional[str], as_json: bool) -> None:
    """`ldfleet registry usage --source inference`: per device, from the inference telemetry roll-ups."""
    from ldfleet.server.telemetry import usage

    if run is not None and db is None:
        db = run_registry(run)[0]
    reg = open_registry(db, must_exist=True)
    try:
        out = usage(reg)
    finally:
        reg.close()
    if not out:
        fail(f"no inference telemetry in {reg.redacted_url()} (devices publish it while `ldfleet serve` runs)")
    if as_json:
        print(json.dumps({"source": "inference", "by": "device", "usage": out}, indent=1))
        return
    L = max(len(v["usage"]) for v in out.values())
    t = Table(title="layer usage of served requests (inference telemetry)")
    for col in ("device", "minutes", "requests", "layers", "misses", "governor", "worst p99 ms"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for i in range(L):
        t.add_column(f"L{i}", justify="right")
    for key, v in sorted(out.items()):
        t.add_row(key, str(v["minutes"]), str(v["requests"]), f"{v['mean_layers']:.2f}", str(v["deadline_misses"]),
                  str(v["interventions"]), "-" if v["p99_ms"] is None else f"{v['p99_ms']:.1f}",
                  *[f"{u:.2f}" for u in v["usage"]])
    console.print(t)
