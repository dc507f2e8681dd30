"""On-device inference: a runtime (torch or onnxruntime), the policy in force, the governor, statistics.

``open_engine`` opens a run folder on torch or an ONNX export on onnxruntime; both give a
``Result`` per input. ``PolicySource`` reads the agent's local state (``client/state.py``) again
whenever the file changes, so a new policy version applies from the next request on, or stands in
for fixed overrides (``--keep`` / ``--latency-ms`` / ``--rtf``). ``InferenceSession`` ties them together: per
request the policy gives the ceiling k, the governor may lower it, the runtime runs it, and the
statistics the telemetry publisher reports are updated.
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldfleet.client.governor import Decision, Governor
from ldfleet.client.state import load_device_state, state_path
from ldfleet.client.telemetry import InferenceStats
from ldfleet.common.budget import target_ms
from ldfleet.common.edge_runtime import MANIFEST, SAMPLE_RATE, EdgeModel, Result, check_length, keep_to_k
from ldfleet.common.schemas import utcnow

RUNTIMES = ("torch", "onnx", "onnx-int8")


def open_engine(run: str | Path, runtime: str = "torch", threads: int = 1, strategy: str = "selector"):
    """A runtime for ``run``: a run folder (torch) or an ONNX export folder (onnx, onnx-int8), running
    ``strategy`` (``selector``: k layers per input; ``adaptive``: a depth per input at a mean of k).

    Raises FileNotFoundError / ValueError with a hint when the folder does not fit the runtime or
    cannot run the strategy.
    """
    run = Path(run)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    exported = (run / MANIFEST).exists()
    if runtime == "torch":
        if exported:
            raise ValueError(f"{run} is an ONNX export: use --runtime onnx (or give the run folder)")
        from ldfleet.common.model.inference import TorchEngine

        return TorchEngine(run, threads, strategy)
    if not exported:
        raise FileNotFoundError(f"{run} is not an ONNX export: make one with `ldfleet export {run} --format onnx --out DIR`"
                                + (", or run it on torch with --runtime torch" if (run / "train_state.json").exists()
                                   or (run / "model.safetensors").exists() else ""))
    engine = EdgeModel(run, "int8" if runtime == "onnx-int8" else "fp32", threads, strategy)
    engine.runtime = runtime
    return engine


@dataclass(frozen=True)
class Policy:
    """The ceiling for the next request: k layers, an optional latency target (ms per input, or a
    real-time factor: ms per ms of audio), where it came from."""

    k: int
    latency_ms: float | None
    version: int
    source: str  # "keep", "latency", "rtf", "state", "none"
    rtf: float | None = None

    def target_ms(self, seconds: float) -> float | None:
        """The latency an input of ``seconds`` of audio must meet under this policy (None: no target)."""
        return target_ms(self.latency_ms, self.rtf, seconds)


class PolicySource:
    """The policy in force: fixed (``keep`` / ``latency_ms`` / ``rtf``) or read from an agent state dir.

    The state file is read again only when its (inode, mtime, size) changes, so checking before every
    request costs one ``stat``; an expired policy falls back to the full model. A corrupt or
    missing file keeps the last good policy (full model before any).
    """

    def __init__(self, num_layers: int, state_dir: str | Path | None = None, keep: float | None = None,
                 latency_ms: float | None = None, rtf: float | None = None):
        self.num_layers = num_layers
        self.state_dir = Path(state_dir) if state_dir else None
        self._fixed = None
        if keep is not None or latency_ms is not None or rtf is not None:
            k = keep_to_k(keep, num_layers) if keep is not None else num_layers
            source = "keep" if keep is not None else "rtf" if rtf is not None else "latency"
            self._fixed = Policy(k, latency_ms, 0, source, rtf)
        self._stamp: tuple[int, int, int] | None = None
        self._expires = None  # expiry of the policy read last: re-read when it passes
        self._policy = Policy(num_layers, None, 0, "none")
        self._lock = threading.Lock()

    def current(self) -> Policy:
        if self._fixed is not None:
            return self._fixed
        if self.state_dir is None:
            return self._policy
        try:
            st = os.stat(state_path(self.state_dir))
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # the agent replaces the file: a new inode
        except OSError:
            return self._policy
        with self._lock:
            expired = self._expires is not None and utcnow() >= self._expires
            if stamp != self._stamp or expired:
                self._stamp = stamp
                self._policy = self._read()
            return self._policy

    def _read(self) -> Policy:
        try:
            state = load_device_state(self.state_dir)
        except ValueError:
            return self._policy
        self._expires = state.policy.expires_at if state is not None and state.policy is not None else None
        if state is None or state.policy is None or state.policy_expired():
            self._expires = None
            return Policy(self.num_layers, None, state.version if state else 0, "none")
        k = min(self.num_layers, state.effective_k or self.num_layers)
        if state.effective_k is None and state.policy.keep is not None:
            k = keep_to_k(state.policy.keep, self.num_layers)
        return Policy(k, state.policy.latency_ms, state.version, "state", state.policy.rtf)


def warm_up(engine, governor: Governor, runs: int = 3, seconds: float = 1.0) -> None:
    """Run ``runs`` inputs of ``seconds`` of quiet noise at every layer before the first request.

    A runtime's first calls allocate memory and pick kernels, so they take several times longer than
    the rest (a fresh torch process: ~4x on the first request, onnxruntime ~2x); and the governor has
    no estimates before it has observed a request, so the first real request would run unplanned, and
    under a target its deadline guard would cut it. The first run is discarded; the others feed the
    governor's estimates. ``runs`` < 2 warms the runtime only.
    """
    wave = np.random.default_rng(0).normal(0.0, 0.01, int(seconds * SAMPLE_RATE)).astype(np.float32)
    for i in range(runs):
        start = time.perf_counter()
        result = engine.run(wave, engine.num_layers)
        result.ms = (time.perf_counter() - start) * 1000
        if i > 0:
            governor.observe(result, seconds)


def run_decided(engine, waveform: np.ndarray, decision: Decision) -> Result:
    """Run one input as the governor decided: the selector at ``decision.k``; ``adaptive`` at its own
    depth for a mean of the policy's k (``decision.ceiling``), unless that is deeper than the target
    allows (``decision.max_layers``). The deadline guard holds it to ``decision.target_ms``."""
    adaptive = getattr(engine, "strategy", "selector") == "adaptive"
    k = decision.ceiling if adaptive and decision.ceiling is not None else decision.k
    return engine.run(waveform, k, decision.target_ms, decision.max_layers)


class InferenceSession:
    """One device's inference: engine + policy + governor + statistics (thread-safe, one run at a time)."""

    def __init__(self, engine, policy: PolicySource, governor: Governor | None = None,
                 stats: InferenceStats | None = None):
        self.engine = engine
        self.policy = policy
        self.governor = governor or Governor(engine.num_layers)
        self.stats = stats or InferenceStats(engine.num_layers)
        self._lock = threading.Lock()

    def warm_up(self, runs: int = 3, seconds: float = 1.0) -> None:
        """``warm_up`` this session's engine and governor before its first request; counts no request
        in the statistics (nor the telemetry)."""
        with self._lock:
            warm_up(self.engine, self.governor, runs, seconds)

    def infer(self, waveform: np.ndarray, deadline_ms: float | None = None) -> tuple[Result, Decision, Policy]:
        """Run one waveform ``[samples]`` (16 kHz); ``deadline_ms`` overrides the policy's latency target
        (an RTF policy's target is per input: ``rtf * 1000 *`` its seconds). The governor plans for the
        input's duration (utterances differ in length; clips are 1 s)."""
        seconds = len(waveform) / SAMPLE_RATE
        with self._lock:
            policy = self.policy.current()
            target = deadline_ms if deadline_ms is not None else policy.target_ms(seconds)
            decision = self.governor.decide(policy.k, target, seconds)
            start = time.perf_counter()
            try:
                result = run_decided(self.engine, waveform, decision)
            except Exception:  # the runtime failed on this input: counted in the telemetry, raised to the caller
                self.stats.record_error()
                raise
            if result.cut_short:
                decision.reasons.append(f"deadline guard: stopped after {len(result.layers)} of {result.chosen} layers")
            result.ms = (time.perf_counter() - start) * 1000
            self.governor.observe(result, seconds)
            self.stats.record(result, decision)
            return result, decision, policy


class AudioError(ValueError):
    """Audio the model cannot take, with the reason; ``status`` is what `ldfleet serve` answers with:
    415 for data that is not audio soundfile can read, 422 for audio it refuses (no samples, non-finite
    samples, too short)."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.status = status


class AudioBytes(io.BytesIO):
    """Audio bytes for soundfile, whose seeks never raise: a header claiming a size past 2^63 makes
    libsndfile seek there, and a plain BytesIO's OverflowError inside soundfile's C callback is printed
    to stderr as a traceback per request (the decode itself is right). Such a seek goes to the end, as
    a file's seek past its end reads nothing."""

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        try:
            return super().seek(pos, whence)
        except OverflowError:
            return super().seek(0, io.SEEK_END)


def _read_wav(data: bytes | str | Path) -> tuple[np.ndarray, int]:
    """Samples ``[frames, channels]`` float32 and the rate of WAV bytes or a path (soundfile);
    AudioError when it is not audio soundfile can read, or holds no or non-finite samples."""
    import soundfile as sf

    from ldfleet.common.data.validate import BadClip, check_samples

    src = AudioBytes(data) if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        audio, rate = sf.read(src, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = str(exc).replace(repr(src), "the data") if not isinstance(src, str) else str(exc)
        raise AudioError(f"not a readable audio file (WAV, FLAC, OGG or MP3): {reason}", 415) from None
    try:
        return check_samples("the WAV file", audio), rate  # the data layer's checks: no samples, non-finite ones
    except BadClip as exc:
        raise AudioError(str(exc)) from None  # "the WAV file: <reason>"


def clip_from_wav(data: bytes | str | Path) -> np.ndarray:
    """WAV bytes or a path -> 1 s of 16 kHz mono float32, as keyword training saw clips (resample,
    trim, centre). Raises AudioError (a ValueError) when the data is not audio soundfile can read, or
    shorter than a speech-recognition input may be (``edge_runtime.MIN_SAMPLES``: no word fits)."""
    from ldfleet.common.data.audio import fix_length, resample, to_mono, trim_silence

    audio, rate = _read_wav(data)
    return fix_length(trim_silence(_long_enough(resample(to_mono(audio), rate))))


def utterance_from_wav(data: bytes | str | Path) -> np.ndarray:
    """WAV bytes or a path -> the whole utterance as 16 kHz mono float32 ``[samples]``, untrimmed, as
    speech-recognition training reads it (``common.data.transcribed.read_utterance``). Raises
    AudioError (a ValueError) when the data is not audio soundfile can read, or too short for the
    model (``edge_runtime.MIN_SAMPLES``)."""
    from ldfleet.common.data.audio import resample, to_mono

    audio, rate = _read_wav(data)
    return _long_enough(resample(to_mono(audio), rate))


def _long_enough(wave: np.ndarray) -> np.ndarray:
    """``wave`` unchanged, or AudioError (422 in `serve`) when it is shorter than ``MIN_SAMPLES``."""
    try:
        check_length(wave)
    except ValueError as exc:
        raise AudioError(str(exc)) from None
    return wave


def input_from_wav(data: bytes | str | Path, task: str) -> np.ndarray:
    """A model input from WAV bytes or a path, as the run's task was trained: a 1 s clip (``kws``)
    or the whole utterance (``asr``). Raises ValueError for unreadable audio."""
    return utterance_from_wav(data) if task == "asr" else clip_from_wav(data)
