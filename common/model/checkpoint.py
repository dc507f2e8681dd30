"""Saving and loading a dynamic model as a run folder: ``model.json`` + ``model.safetensors``.

The backbone's config and the task head's spec (label set or CTC vocabulary) are stored next to
the weights, so a run re-opens as the same task without the hub or the original checkpoint
folder — what an edge device needs. The config carries the checkpoint's input spec
(``ldfleet_input_spec``: normalise or not, see :mod:`.inputs`), so a saved run prepares audio
exactly as the checkpoint it came from; runs saved before it existed normalise, as they always did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .backbone import backbone_from_config
from .dynamic import DynamicModel
from .heads import head_from_spec

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model(model: DynamicModel, run_dir: str | Path, extra: dict | None = None) -> None:
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone_config": model.runner.backbone.config.to_dict(),
        "task": model.task,
        "head": model.head_spec(),
        "selector_hidden": model.selector_hidden,
        "selector_budget": model.selector_budget,
        "static_budget": model.static_budget,
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write_bytes(run / WEIGHTS, lambda p: save_file(state, str(p)))
    _atomic_write_bytes(run / MODEL_JSON, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))


def read_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MODEL_JSON
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a trained run (no {MODEL_JSON}); train one with `ldfleet train`")
    return json.loads(path.read_text())


def head_spec_of(meta: dict) -> dict:
    """The head spec of a run; runs saved before heads had specs were 12-class keyword spotters."""
    if "head" in meta:
        return meta["head"]
    from ..data.labels import LABELS

    return {"type": "classification", "labels": list(LABELS)[: meta.get("num_classes", len(LABELS))]}


def load_model(run_dir: str | Path) -> DynamicModel:
    """The run's model, weights loaded, in eval mode. A Whisper run (``"family": "whisper"``) keeps
    its own folder format and loads as a :class:`~.whisper_dynamic.WhisperDynamic` (a DynamicModel)."""
    meta = read_meta(run_dir)
    if meta.get("family") == "whisper":
        from .whisper_dynamic import WhisperDynamic

        return WhisperDynamic.load(run_dir)
    backbone = backbone_from_config(meta["backbone_config"])
    head = head_from_spec(head_spec_of(meta), backbone.config.hidden_size, backbone)
    model = DynamicModel(backbone, head, meta.get("selector_hidden", 64), meta.get("selector_budget", False),
                         meta.get("static_budget", False))
    model.load_state_dict(load_file(str(Path(run_dir) / WEIGHTS)))
    return model.eval()
