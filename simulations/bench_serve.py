"""`ldfleet bench serve`: the inference service under a bounded concurrent load, with a policy change.

The service (``client/serve.py``) runs on loopback in this process; an aiohttp client sends
``requests`` WAV clips with at most ``concurrency`` in flight. When half of them have been answered,
a new policy version is written to the service's agent state dir (as the agent would); requests from
then on must run under it. Reported: answered / errors / lost, client-side p50/p99 (queueing
included), the policy versions seen, and how many answers came after the change under the old one.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ldfleet.client.infer import InferenceSession, PolicySource, open_engine
from ldfleet.client.serve import ServiceThread, build_app
from ldfleet.client.state import DeviceState, save_device_state
from ldfleet.client.telemetry import percentile
from ldfleet.common.schemas import BudgetPolicy, utcnow

DEVICE = "bench-serve"


@dataclass
class ServeRow:
    requests: int
    concurrency: int
    answered: int
    errors: int
    lost: int
    p50_ms: float
    p99_ms: float
    model_p50_ms: float
    throughput_rps: float
    policy_before: int
    policy_after: int
    k_before: int
    k_after: int
    stale_after_change: int  # answers under the old version that were *sent* after the change was written


def write_policy(state_dir: Path, version: int, keep: float, num_layers: int) -> None:
    """A device state as the agent writes it: policy ``version`` at ``keep``."""
    k = max(1, round(keep * num_layers))
    policy = BudgetPolicy(device_id=DEVICE, version=version, source="device", keep=keep, k=k, num_layers=num_layers,
                          issued_at=utcnow(), issued_by="bench")
    save_device_state(state_dir, DeviceState(device_id=DEVICE, device_class="bench", version=version, policy=policy,
                                             effective_k=k))


def wav_bytes(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _load(url: str, bodies: list[bytes], requests: int, concurrency: int, on_half) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    results: list[dict] = []
    half = asyncio.Event()
    changed_at = [None]

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        async with sem:
            sent = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/infer", data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "audio/wav"}) as resp:
                    body = await resp.json()
                    results.append({**body, "status": resp.status, "client_ms": (time.perf_counter() - sent) * 1000,
                                    "sent": sent})
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                results.append({"status": -1, "error": str(exc), "sent": sent})
            if len(results) >= requests // 2 and not half.is_set():
                half.set()
                on_half()
                changed_at[0] = time.perf_counter()

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(one(i, session) for i in range(requests)))
    for r in results:
        r["after_change"] = changed_at[0] is not None and r["sent"] > changed_at[0]
    return results


def bench_serve(export_or_run: Path, clips: list[np.ndarray], state_dir: Path, runtime: str = "onnx",
                requests: int = 1000, concurrency: int = 200, keep_before: float = 1.0, keep_after: float = 0.5,
                threads: int = 1) -> ServeRow:
    engine = open_engine(export_or_run, runtime, threads)
    L = engine.num_layers
    write_policy(state_dir, 1, keep_before, L)
    session = InferenceSession(engine, PolicySource(L, state_dir))
    service = ServiceThread(build_app(session)).start()
    bodies = [wav_bytes(c) for c in clips]
    start = time.perf_counter()
    try:
        results = asyncio.run(_load(service.url, bodies, requests, concurrency,
                                    lambda: write_policy(state_dir, 2, keep_after, L)))
    finally:
        service.stop()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    lat = [r["client_ms"] for r in ok]
    before = [r for r in ok if r["policy_version"] == 1]
    after = [r for r in ok if r["policy_version"] == 2]
    return ServeRow(
        requests=requests, concurrency=concurrency, answered=len(ok), errors=len(results) - len(ok),
        lost=requests - len(results), p50_ms=statistics.median(lat) if lat else 0.0,
        p99_ms=percentile(lat, 99) if lat else 0.0,
        model_p50_ms=statistics.median(r["ms"] for r in ok) if ok else 0.0,
        throughput_rps=len(ok) / wall, policy_before=1, policy_after=2,
        k_before=before[0]["k"] if before else 0, k_after=after[0]["k"] if after else 0,
        stale_after_change=sum(1 for r in before if r["after_change"]),
    )


def as_dict(row: ServeRow) -> dict:
    return asdict(row)
