"""`ldfleet serve`: the HTTP API on loopback, clear 4xx for bad requests, a policy change under load."""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from edge_fixtures import post_wav, tiny_export, tiny_run, wav_folder  # noqa: F401 - fixtures
from ldfleet.client.infer import InferenceSession, PolicySource, open_engine
from ldfleet.client.serve import ServiceThread, build_app
from ldfleet.simulations.bench_serve import bench_serve, write_policy


@pytest.fixture
def service(tiny_export, tmp_path):
    engine = open_engine(tiny_export, "onnx")
    write_policy(tmp_path, 1, 0.5, engine.num_layers)
    svc = ServiceThread(build_app(InferenceSession(engine, PolicySource(8, tmp_path)), max_bytes=200_000)).start()
    yield svc
    svc.stop()


def _wav(samples: int, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(samples) / 5.0), rate, format=fmt)
    return buf.getvalue()


def test_infer_health_and_metrics(service, wav_folder):
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=10) as resp:  # before any request: the version in force
        assert "ldfleet_policy_version 1.0" in resp.read().decode()
    status, body = post_wav(service.url, (wav_folder / "clip_03.wav").read_bytes())
    assert status == 200 and body["k"] == 4 and len(body["layers"]) == 4 and body["policy_version"] == 1
    status, body = post_wav(service.url, _wav(16000), "?deadline_ms=5000")
    assert status == 200 and body["k"] == 4
    with urllib.request.urlopen(f"{service.url}/v1/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["policy"]["k"] == 4 and health["requests"] == 2
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'ldfleet_infer_requests_total{status="200"} 2.0' in text and 'ldfleet_infer_layers_total{k="4"} 2.0' in text


def test_other_sample_rates_are_resampled_as_infer_does(service, tiny_export):
    from ldfleet.client.infer import clip_from_wav

    body = _wav(8000, rate=8000)  # 1 s of telephone-rate audio
    status, answer = post_wav(service.url, body)
    assert status == 200 and answer["k"] == 4
    assert answer["prediction"] == open_engine(tiny_export, "onnx").run(clip_from_wav(body), 4).prediction
    status, answer = post_wav(service.url, _wav(8000 * 11, rate=8000), "")
    assert status in (413, 422)  # 11 s: over a cap whatever the rate


def test_every_wav_container_is_served_as_plain_wav(service):
    """WAVE_FORMAT_EXTENSIBLE (ffmpeg's and many recorders' 24-bit files), RF64 and Wave64 carry the same
    samples as a plain WAV and get the same answer."""
    plain = post_wav(service.url, _wav(16000))[1]["prediction"]
    for fmt in ("WAVEX", "RF64", "W64"):
        code, answer = post_wav(service.url, _wav(16000, fmt=fmt))
        assert code == 200 and answer["prediction"] == plain, (fmt, answer)


def test_a_header_claiming_an_absurd_size_is_read_without_tracebacks_in_the_log(monkeypatch):
    """An RF64 whose 64-bit data size is 2^63-1 makes libsndfile seek past what a BytesIO allows; the
    clip still decodes, and no "Exception ignored" traceback reaches stderr."""
    import struct
    import sys

    from ldfleet.client.serve import parse_wav

    ignored = []  # what Python would print as "Exception ignored from cffi callback"
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    body = bytearray(_wav(16000, fmt="RF64"))
    assert body[:4] == b"RF64" and body[12:16] == b"ds64"
    struct.pack_into("<Q", body, 28, 2**63 - 1)  # ds64: riff size (8 bytes) at 20, data size at 28
    wave = parse_wav(bytes(body), 10.0, "kws")
    assert wave.shape == (16000,) and not ignored, [u.exc_value for u in ignored]


@pytest.mark.parametrize("body, query, status, words", [
    (b"", "", 400, "empty body"),
    (b"RIFF" + b"\0" * 100, "", 415, "not a WAV"),
    (None, "", 415, "WAV"),  # a FLAC file
    (_wav(16000, rate=4000), "", 422, "4000 Hz"),
    (_wav(1), "", 422, "too short"),  # a keyword clip of one sample: nothing to hear
    (_wav(16000 * 11), "", 413, "cap"),  # over the 200 kB test cap
    (_wav(16000), "?deadline_ms=-3", 400, "deadline_ms"),
    (_wav(16000), "?deadline_ms=1_000", 400, "deadline_ms"),
    (_wav(16000), "?deadline_ms=%D9%A3", 400, "deadline_ms"),  # an Arabic-Indic 3: float() takes it, a client meant something else
])
def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_serving(service, body, query, status, words):
    body = body if body is not None else _wav(16000, fmt="FLAC")
    code, answer = post_wav(service.url, body, query)
    assert code == status and words in answer["error"]
    assert post_wav(service.url, _wav(16000))[0] == 200


def test_policy_change_under_concurrent_load_applies_without_errors(tiny_export, wav_folder, tmp_path):
    from ldfleet.client.infer import clip_from_wav

    clips = [clip_from_wav(p) for p in sorted(wav_folder.glob("*.wav"))]
    row = bench_serve(tiny_export, clips, tmp_path, "onnx", requests=120, concurrency=30, keep_before=1.0, keep_after=0.25)
    assert (row.answered, row.errors, row.lost) == (120, 0, 0)
    assert (row.k_before, row.k_after) == (8, 2)
    assert row.stale_after_change == 0


def test_serve_says_why_it_cannot_listen_and_how_to_open_a_run_folder(tiny_export, tiny_run):
    """A taken port is one line saying so, not a traceback; a run folder on the ONNX runtime is told
    about --runtime torch as well as export."""
    import socket

    from typer.testing import CliRunner

    from ldfleet.cli import app

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = runner.invoke(app, ["serve", "--run", str(tiny_export), "--port", str(port), "--telemetry-interval", "0"])
    assert out.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in " ".join(out.output.split())
    assert "Traceback" not in out.output
    out = runner.invoke(app, ["serve", "--run", str(tiny_run), "--telemetry-interval", "0"])
    assert out.exit_code == 2 and "--runtime torch" in " ".join(out.output.split())
