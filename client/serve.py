"""`ldfleet serve`: the device's inference service over HTTP (aiohttp), loopback by default.

API:

* ``POST /v1/infer`` — body: a WAV file (RIFF, WAVE_FORMAT_EXTENSIBLE, RF64 or Wave64; 8-192 kHz, resampled to 16 kHz as ``ldfleet infer`` does;
  any number of channels, mixed to mono; at most ``max_seconds``; PCM or float), optional query ``deadline_ms``. 200: ``{"prediction", "k", "layers", "ms", "queue_ms",
  "policy_version", "policy_k", "governor", "target_ms"}`` (``target_ms``: the latency this input was
  held to, from ``deadline_ms`` or the policy, an RTF scaled by its seconds; null without one); ``prediction`` is a label (a keyword model; the audio is trimmed
  and centred in 1 s) or a transcript (a speech-recognition model; the whole utterance). 400 empty
  body or bad ``deadline_ms``, 413 over the size cap, 415 not a WAV file, 422 wrong sample rate /
  implausible sample rate / too long / too short / no samples / non-finite samples, 500 when the runtime fails on the input
  (logged, counted as an error in the telemetry), 503 while shutting down.
* ``GET /v1/health`` — ``{"status": "ok", "runtime", "task", "strategy", "num_layers", "policy": {...},
  "requests"}``.
* ``GET /metrics`` — Prometheus text format (prometheus_client): requests by status, latency
  histogram, encoder layers run, governor interventions, deadline misses, policy version.

Requests run one at a time on one worker thread (batch 1, as on a small device); the policy is
looked up per request, so a new policy version (agent state dir) applies from the next request on,
while requests already running finish under the one they started with.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ldfleet.client.infer import AudioBytes, InferenceSession
from ldfleet.common.data.validate import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

log = logging.getLogger("ldfleet.serve")

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: 30 s of 16-bit mono at 16 kHz
DEFAULT_MAX_SECONDS = 10.0
#: libsndfile's names of the WAV family: RIFF WAVE, WAVE_FORMAT_EXTENSIBLE (what many recorders and
#: ffmpeg write for 24-bit or multichannel audio), and the 64-bit RF64 (EBU Tech 3306) and Sony Wave64.
WAV_FORMATS = ("WAV", "WAVEX", "RF64", "W64")


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_wav(body: bytes, max_seconds: float = DEFAULT_MAX_SECONDS, task: str = "kws") -> np.ndarray:
    """Validated WAV bytes -> the model input for ``task`` (``client.infer.input_from_wav``: a 1 s clip
    or the whole utterance), float32 mono at 16 kHz; raises ``BadRequest`` with the reason."""
    if not body:
        raise BadRequest(400, "empty body: send a WAV file (16 kHz)")
    try:
        info = sf.info(AudioBytes(body))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise BadRequest(415, f"not a WAV file ({str(exc).rsplit(': ', 1)[-1]})") from None
    if info.format not in WAV_FORMATS:
        raise BadRequest(415, f"format {info.format}: send a WAV file")
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:  # other rates are resampled to 16 kHz, as `infer` does
        raise BadRequest(422, f"sample rate {info.samplerate} Hz: send {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (16 kHz is read as is)")
    if info.frames == 0:
        raise BadRequest(422, "the WAV file holds no samples")
    if info.frames > max_seconds * info.samplerate:
        raise BadRequest(422, f"{info.frames} samples at {info.samplerate} Hz ({info.frames / info.samplerate:.4g} s) is over the "
                              f"{max_seconds:g} s cap")
    from ldfleet.client.infer import AudioError, input_from_wav

    try:
        return input_from_wav(body, task)
    except AudioError as exc:
        raise BadRequest(exc.status, str(exc)) from None


#: A plain ASCII decimal number (``deadline_ms``): digits, an optional fraction and exponent.
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")


class Metrics:
    """The service's Prometheus metrics, in their own registry (several services per process in tests)."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ldfleet_infer_requests", "Inference requests by HTTP status.", ["status"], registry=r)
        self.latency = Histogram("ldfleet_infer_latency_seconds", "Model time per request.", registry=r,
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
        self.k = Counter("ldfleet_infer_layers", "Requests by number of encoder layers run (k: the layers that ran).", ["k"],
                         registry=r)
        self.interventions = Counter("ldfleet_governor_interventions", "Requests run below the policy's k.", registry=r)
        self.misses = Counter("ldfleet_deadline_misses", "Requests over their latency target.", registry=r)
        self.policy_version = Gauge("ldfleet_policy_version", "Version of the policy in force.", registry=r)
        self.num_layers = num_layers


def build_app(session: InferenceSession, max_bytes: int = DEFAULT_MAX_BYTES,
              max_seconds: float = DEFAULT_MAX_SECONDS) -> web.Application:
    """The aiohttp application around one ``InferenceSession``."""
    metrics = Metrics(session.engine.num_layers)
    task = getattr(session.engine, "task", "kws")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
    app = web.Application(client_max_size=max_bytes)

    def refuse(status: int, reason: str) -> web.Response:
        metrics.requests.labels(str(status)).inc()
        log.info("refused request: %d %s", status, reason)
        return web.json_response({"error": reason}, status=status)

    async def infer(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_bytes:
            return refuse(413, f"body of {request.content_length} bytes is over the {max_bytes}-byte cap")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, f"body is over the {max_bytes}-byte cap")
        deadline = request.query.get("deadline_ms")
        try:
            if deadline is not None and not _DECIMAL.fullmatch(deadline):
                raise ValueError  # float() would also take "1_000", " 3", other scripts' digits
            deadline_ms = float(deadline) if deadline is not None else None
            if deadline_ms is not None and not (0 < deadline_ms < 1e7):
                raise ValueError
        except ValueError:
            return refuse(400, f"deadline_ms must be a number of ms in (0, 1e7), got {deadline!r}")
        try:
            wave = parse_wav(body, max_seconds, task)
        except BadRequest as exc:
            return refuse(exc.status, exc.reason)
        queued = time.perf_counter()
        try:
            running = asyncio.get_running_loop().run_in_executor(executor, session.infer, wave, deadline_ms)
        except RuntimeError as exc:  # the executor is shut down: no new work
            return refuse(503, f"shutting down ({exc})")
        try:
            result, decision, policy = await running
        except Exception as exc:  # noqa: BLE001 - the runtime failed on this input: a 500 with the reason, the service goes on
            log.exception("inference failed")
            return refuse(500, f"inference failed: {exc}")
        total_ms = (time.perf_counter() - queued) * 1000
        metrics.requests.labels("200").inc()
        metrics.latency.observe(result.ms / 1000)
        metrics.k.labels(str(len(result.layers))).inc()  # layers that ran (adaptive's depth, the guard's cut), as the telemetry counts
        if decision.intervened:
            metrics.interventions.inc()
        if decision.target_ms is not None and result.ms > decision.target_ms:
            metrics.misses.inc()
        return web.json_response({
            "prediction": result.prediction, "k": result.k, "layers": result.layers, "ms": round(result.ms, 3),
            "queue_ms": round(max(0.0, total_ms - result.ms), 3), "policy_version": policy.version,
            "policy_k": policy.k, "governor": decision.explain(),
            "target_ms": None if decision.target_ms is None else round(decision.target_ms, 3),
        })

    async def health(_request: web.Request) -> web.Response:
        p = session.policy.current()
        return web.json_response({
            "status": "ok", "runtime": getattr(session.engine, "runtime", "onnx"), "task": task,
            "strategy": getattr(session.engine, "strategy", "selector"),
            "num_layers": session.engine.num_layers,
            "policy": {"k": p.k, "latency_ms": p.latency_ms, "rtf": p.rtf, "version": p.version, "source": p.source},
            "requests": session.governor.decisions,
        })

    async def prometheus(_request: web.Request) -> web.Response:
        metrics.policy_version.set(session.policy.current().version)  # the version in force now, as /v1/health says
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(_app: web.Application) -> None:
        executor.shutdown(wait=True)  # requests in flight finish first

    app.router.add_post("/v1/infer", infer)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", prometheus)
    app.on_cleanup.append(close)
    return app


class ServiceThread:
    """Runs an app on host:port in a background thread with its own event loop (tests, benchmarks).

    ``port=0`` picks a free port; ``url`` is valid after ``start()`` returns.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ldfleet-serve", daemon=True)
        self._runner: web.AppRunner | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._runner = web.AppRunner(self.app, access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
            self.loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self, timeout: float = 30.0) -> ServiceThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"service did not start on {self.host}:{self.port}: {self.error}")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
