"""This device's compute profile: cores, memory, and the measured latency of the configured model.

``measure_profile`` times the model with ``ldfleet.common.model.profiling.measure_latency`` (front end
and every encoder layer at a reference input length, median of repeats); the model code (and torch)
is imported only there, so the agent can run from a profile given as data (``profile_from_json``,
``synthetic_profile``) without the model stack, e.g. in tests and the control-plane benchmark.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from ldfleet.common.schemas import DeviceProfile, utcnow
from ldfleet.common.topics import is_valid_device_id


def default_device_id() -> str:
    """The host name, reduced to the device-id alphabet."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "device"
    return name[:64] if is_valid_device_id(name[:64]) else "device"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
    except (ValueError, OSError, AttributeError):
        return 0


def battery_fraction() -> float | None:
    for path in sorted(glob.glob("/sys/class/power_supply/BAT*/capacity")):
        try:
            return max(0.0, min(1.0, int(Path(path).read_text().strip()) / 100))
        except (OSError, ValueError):
            continue
    return None


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 3)
    except (OSError, AttributeError):
        return None


def system_info() -> dict[str, Any]:
    return {"cores": cpu_cores(), "memory_mb": memory_mb(), "battery": battery_fraction(), "load": load_average()}


def _accelerator() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)[:64]
    except Exception:  # noqa: BLE001
        pass
    return None


def measure_profile(
    device_id: str,
    device_class: str,
    *,
    family: str = "wavlm",
    size: str = "tiny",
    seconds: float = 1.0,
    repeats: int = 5,
    revision: int = 0,
) -> DeviceProfile:
    """Measure this machine: system facts plus the model's front-end and per-layer latency."""
    from ldfleet.common.model.profiling import measure_latency  # heavy (torch): only when measuring

    lat = measure_latency(family=family, size=size, seconds=seconds, repeats=repeats)
    return DeviceProfile(
        device_id=device_id,
        device_class=device_class,
        revision=revision,
        accelerator=_accelerator(),
        model_id=str(lat.model_id)[:200] or f"{family}-{size}",
        num_layers=int(lat.num_layers),
        front_end_ms=float(lat.front_end_ms),
        layer_ms=[float(x) for x in lat.layer_ms],
        reference_seconds=float(getattr(lat, "seconds", seconds)),
        latency_ratio_p90=lat.ratio_p90,
        latency_ratio_p99=lat.ratio_p99,
        measured_at=utcnow(),
        **system_info(),
    )


def synthetic_profile(
    device_id: str,
    device_class: str,
    *,
    num_layers: int = 12,
    layer_ms: list[float] | float = 2.0,
    front_end_ms: float = 5.0,
    model_id: str = "synthetic",
    cores: int = 1,
    memory_mb_: int = 1024,
    revision: int = 0,
    reference_seconds: float = 1.0,
) -> DeviceProfile:
    """A profile given as numbers (simulated devices, tests): no measurement, no model; the timings
    are for ``reference_seconds`` of audio."""
    per_layer = [float(layer_ms)] * num_layers if isinstance(layer_ms, (int, float)) else [float(x) for x in layer_ms]
    return DeviceProfile(
        device_id=device_id,
        device_class=device_class,
        revision=revision,
        cores=cores,
        memory_mb=memory_mb_,
        model_id=model_id,
        num_layers=num_layers,
        front_end_ms=float(front_end_ms),
        layer_ms=per_layer,
        reference_seconds=reference_seconds,
        measured_at=utcnow(),
    )


def profile_from_json(path: str | os.PathLike[str], device_id: str, device_class: str) -> DeviceProfile:
    """A profile from a file: the output of ``ldfleet profile --json`` or just the latency part
    (``{"model_id", "num_layers", "front_end_ms", "layer_ms"}``). Device id and class always come
    from the caller; missing system facts are measured here."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    data.pop("schema", None)
    data["device_id"] = device_id
    data["device_class"] = device_class
    for key, value in system_info().items():
        data.setdefault(key, value)
    data.setdefault("model_id", "unknown")
    if "layer_ms" in data and "num_layers" not in data:
        data["num_layers"] = len(data["layer_ms"])
    return DeviceProfile.model_validate_json(json.dumps(data))
