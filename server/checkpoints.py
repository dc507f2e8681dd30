"""Checkpoints of the global selector + head, one safetensors file per finished round.

``RUN/checkpoints/round-0003.safetensors`` holds the arrays after round 3 (metadata: run id, round,
time). Files are written atomically (temp file + ``os.replace``); a round counts as complete only
once the registry marks it finished, which happens after its checkpoint is on disk, so resuming
takes the newest checkpoint whose round the registry finished.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^round-(\d{4,})\.safetensors$")


def checkpoint_path(run_dir: str | Path, round_number: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{round_number:04d}.safetensors"


def save_checkpoint(run_dir: str | Path, round_number: int, arrays: dict[str, np.ndarray], run_id: str = "") -> Path:
    path = checkpoint_path(run_dir, round_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(data, str(tmp), metadata={"run_id": run_id, "round": str(round_number), "saved_at": f"{time.time():.3f}"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path, round_number: int) -> dict[str, np.ndarray]:
    return load_file(str(checkpoint_path(run_dir, round_number)))


def checkpoint_rounds(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))
