"""Each strategy's own copy of the encoder layers, after stage 3 with ``joint_encoders="own"``.

Layer-dropping methods are compared with each model fine-tuned for its own way of dropping: random
dropping on a LayerDrop-trained encoder, early exit on one trained with its exits, a learned subset
on one trained on its subsets (supernet training of the chosen subnets, as in Xu et al. 2024,
"Dynamic encoder size based on data-driven layer-wise pruning"). With ``joint_encoders="own"`` stage
3 gives every strategy its own fine-tuned copy of the encoder layers and keeps it in
``RUN/encoders/<strategy>.safetensors``; the model itself (``model.safetensors``, what a device
runs) carries the selector's copy. The front end is shared: it stays frozen in stage 3.

:class:`EncoderSwitch` puts the right copy in place before a method runs (``full``, ``random`` and
the oracles run on random's copy, with the base head that was tuned with it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ENCODERS_DIR = "encoders"
# whose copy each evaluated method runs on
OWNER = {"full": "random", "random": "random", "oracle": "random", "oracle_static": "random",
         "early_exit": "early_exit", "static": "static", "selector": "selector"}
START = "start"  # the encoder (and base head) as stage 3 found them: every copy starts from that encoder
STRATEGIES = ("random", "early_exit", "static", "selector")  # the strategies with a copy


def _encoder(model) -> nn.ModuleList:
    """The encoder layers and what runs after them, as one module whose state is one copy."""
    return nn.ModuleList([model.runner.layers, *model.runner.after_layers()])


def encoder_state(model) -> dict[str, Tensor]:
    """A detached copy of the model's encoder-layer weights (keys as ``_encoder`` names them)."""
    return {k: v.detach().clone().contiguous() for k, v in _encoder(model).state_dict().items()}


def load_encoder_state(model, state: dict[str, Tensor]) -> None:
    """Put a copy from ``encoder_state`` (or a saved one) in place; raises on a mismatched copy."""
    with torch.no_grad():
        _encoder(model).load_state_dict(state)


def encoder_path(run: str | Path, name: str) -> Path:
    return Path(run) / ENCODERS_DIR / f"{name}.safetensors"


def save_encoder(model, run: str | Path, name: str) -> None:
    """Write the model's current encoder layers as ``name``'s copy (atomically)."""
    path = encoder_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(encoder_state(model), str(tmp))
    tmp.replace(path)


def save_start(model, run: str | Path) -> None:
    """Keep the encoder and the base head as stage 3 found them (``encoders/start``): every copy starts
    from that encoder, and the full model they make is the distillation target of every own stage."""
    path = encoder_path(run, START)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {f"base_head.{k}": v.detach().clone().contiguous() for k, v in model.heads["base"].state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file({**{f"encoder.{k}": v for k, v in encoder_state(model).items()}, **head}, str(tmp))
    tmp.replace(path)


def load_start(run: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """The encoder copy and base-head weights ``save_start`` kept in ``run``, or None."""
    path = encoder_path(run, START)
    if not path.exists():
        return None
    state = load_file(str(path))
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    return part("encoder."), part("base_head.")


def load_encoders(run: str | Path) -> dict[str, dict[str, Tensor]]:
    """The strategies' own copies in ``run``: empty for a run with one shared encoder; ValueError when
    the run's own stage 3 has not finished every copy."""
    folder = Path(run) / ENCODERS_DIR
    if not folder.is_dir():
        return {}
    missing = [name for name in STRATEGIES if not encoder_path(run, name).exists()]
    if missing:
        raise ValueError(f"{run}: stage 3 (own encoders) is unfinished, no copy yet for {', '.join(missing)}; "
                         "resume it with the same `ldfleet train` command")
    return {name: load_file(str(encoder_path(run, name))) for name in STRATEGIES}


class EncoderSwitch:
    """Swaps each method's own encoder copy into ``model`` (a no-op without copies).

    ``use(method)`` loads the copy of ``OWNER[method]`` unless it is already in place; ``restore()``
    puts back the weights the model had (the selector's, for a saved run).
    """

    def __init__(self, model, encoders: dict[str, dict[str, Tensor]]):
        self.model, self.encoders = model, encoders
        self.original = encoder_state(model) if encoders else None
        self.current: str | None = None

    def use(self, method: str) -> None:
        owner = OWNER.get(method, "selector")  # anything else runs as the model does
        if not self.encoders or owner == self.current:
            return
        load_encoder_state(self.model, self.encoders[owner])
        self.current = owner

    def restore(self) -> None:
        if self.original is not None:
            load_encoder_state(self.model, self.original)
            self.current = None
