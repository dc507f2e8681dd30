"""Export a run to ONNX as separate graphs, one per part, for the torch-free host runtime.

Graphs (inputs -> outputs, dynamic batch and time axes):

* ``front_end.onnx``: ``waveform`` [batch, samples] -> ``hidden``, ``features`` [batch, frames, dim]
  (per-example normalisation, CNN, projection, positional convolution);
* ``layer_NN.onnx``: ``hidden`` -> ``hidden`` for encoder layer NN (WavLM's relative position bias is
  computed inside each graph, so any subset of layers can run);
* ``selector.onnx``: ``features`` -> ``scores`` [batch, layers]; a selector trained with the budget as
  an input (the speech-recognition default) scores each k differently, so it is exported as one
  graph per k, ``selector_kNN.onnx`` for k = 1..L-1 (k = L runs every layer), and the host picks by k;
* ``depth.onnx`` (when the run's depth stage fitted the ``adaptive`` strategy): ``features`` ->
  ``errors`` [batch, layers], the depth chooser's predicted errors at each depth (the lambdas that
  price a layer per k are in the manifest);
* ``head.onnx``: ``hidden`` -> ``logits`` [batch, classes] (keyword spotting) or [batch, frames, tokens]
  (CTC speech recognition), after the final layer norm when the family has one.

``manifest.json`` lists them (and their int8 versions when asked: onnxruntime dynamic quantization
of MatMul only, the encoder layers and head; the convolutional front end stays fp32, see
PITFALLS.md "Device runtimes"), the task with its labels (kws) or CTC tokens (asr), and the largest
difference to torch measured at export.
A copy of ``ldfleet/common/edge_runtime.py`` is written next to them for boards.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import edge_runtime
from .checkpoint import load_model
from .dynamic import DynamicModel
from .inference import DEVICE_STRATEGY, TorchEngine, device_task, head_logits, labels_of
from .selector import pooled_features

OPSET = 18
_T = {1: "frames"}


class _FrontEnd(nn.Module):
    def __init__(self, model: DynamicModel):
        super().__init__()
        self.model = model

    def forward(self, waveform: Tensor) -> tuple[Tensor, Tensor]:
        front = self.model.front_end(waveform)
        return front.hidden, front.features


class _Layer(nn.Module):
    def __init__(self, model: DynamicModel, index: int):
        super().__init__()
        self.runner, self.index = model.runner, index

    def forward(self, hidden: Tensor) -> Tensor:
        mask, bias = self.runner._layer_context(hidden, None)
        return self.runner._run_layer(self.index, hidden, mask, bias)


class _Selector(nn.Module):
    """The selector's scores; ``k`` fixed at trace time for a budget-conditioned selector."""

    def __init__(self, model: DynamicModel, k: int | None = None):
        super().__init__()
        self.scorer, self.k = model.strategy(DEVICE_STRATEGY).scorer, k

    def forward(self, features: Tensor) -> Tensor:
        return self.scorer(features, None, self.k)


class _Depth(nn.Module):
    """The adaptive depth chooser's predicted errors at every depth ``[B, L]`` from selector features
    (its length input, the frames, counted from the features so that the time axis stays dynamic)."""

    def __init__(self, model: DynamicModel):
        super().__init__()
        self.chooser = model.strategy("adaptive").chooser

    def forward(self, features: Tensor) -> Tensor:
        frames = torch.ones_like(features[..., 0]).sum(1)
        return self.chooser(pooled_features(features, None), frames)


class _Head(nn.Module):
    def __init__(self, model: DynamicModel):
        super().__init__()
        self.model = model

    def forward(self, hidden: Tensor) -> Tensor:
        return head_logits(self.model, self.model.runner._finish(hidden), None)


@torch.no_grad()
def _export(module: nn.Module, example: Tensor, path: Path, inp: str, outs: list[str], axes: dict) -> None:
    """Trace one part (the TorchScript-based exporter: HF's attention traces with dynamic time; the
    tracer's warnings about shape checks in HF code are expected, ``max_difference`` verifies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=[inp], output_names=outs,
            dynamic_axes={inp: axes[inp], **{o: axes[o] for o in outs}}, opset_version=OPSET, dynamo=False,
        )


def _quantize(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger on every graph
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def max_difference(run_dir: str | Path, export_dir: str | Path, seconds: tuple[float, ...] = (1.0, 1.37),
                   seed: int = 0) -> float:
    """Largest |torch - onnx fp32| over logits of random inputs at every k (batch 1), at each input
    length in ``seconds`` (the graphs were traced at 1 s: other lengths check the dynamic time axis;
    a CTC head's logits are compared frame by frame).

    Raises RuntimeError when the onnx selector (or the adaptive depth chooser, when exported) keeps
    other layers than torch's."""
    torch_engine = TorchEngine(run_dir)
    edge = edge_runtime.EdgeModel(export_dir, "fp32")
    adaptive = edge_runtime.EdgeModel(export_dir, "fp32", strategy="adaptive") if edge.manifest.get("adaptive") else None
    model = torch_engine.model
    rng = np.random.default_rng(seed)
    worst = 0.0
    for k in range(1, model.num_layers + 1):
        sec = seconds[k % len(seconds)]
        wave = (0.1 * rng.standard_normal(int(sec * edge_runtime.SAMPLE_RATE))).astype(np.float32)
        logits, result = edge.run_parts(wave, k)
        with torch.inference_mode():
            front = model.front_end(torch.from_numpy(wave).unsqueeze(0))
            keep = torch.zeros(1, model.num_layers, dtype=torch.bool)
            keep[0, result.layers] = True
            ref = head_logits(model, model.runner.run_layers(front, keep), None).numpy()
            torch_keep = model.strategy(DEVICE_STRATEGY).choose(front, k)
        if k < model.num_layers and torch_keep[0].nonzero().flatten().tolist() != result.layers:
            raise RuntimeError(f"onnx selector chose {result.layers}, torch {torch_keep[0].nonzero().flatten().tolist()} at k={k}")
        if adaptive is not None:
            with torch.inference_mode():
                want = model.choose(front, "adaptive", k)[0].nonzero().flatten().tolist()
            got = adaptive.run(wave, k).layers
            if got != want:
                raise RuntimeError(f"onnx adaptive depth chose {got}, torch {want} at k={k}")
        worst = max(worst, float(np.abs(ref - logits).max()))
    return worst


def _answers(model: DynamicModel, task: str) -> dict:
    """What the host runtime needs to turn logits into answers: ``labels`` (kws), or ``ctc`` with the
    full token list (blank first) and its unit (asr)."""
    if task == "kws":
        return {"labels": labels_of(model)}
    vocab = model.head_for(DEVICE_STRATEGY).vocab
    return {"ctc": {"unit": vocab.unit, "tokens": list(vocab.tokens)}}


def _depth_manifest(model: DynamicModel) -> dict | None:
    """The adaptive strategy's part of the manifest (its graph, lambda per k, the calibration clips'
    mean frames), or None when the run has no fitted depth chooser."""
    chooser = model.strategy("adaptive").chooser
    if not chooser.is_fitted:
        return None
    return {"graph": "depth.onnx", "lambdas": chooser.lambdas.tolist(), "ref_frames": float(chooser.ref_frames)}


def export_onnx(run_dir: str | Path, out_dir: str | Path, int8: bool = True,
                on_step: Callable[[str], None] | None = None) -> dict:
    """Write every graph, the manifest and the runtime module to ``out_dir``; returns the manifest.

    Raises FileNotFoundError when ``run_dir`` is not a trained run; ValueError, before anything is
    written, for a model the edge runtime cannot serve (a Whisper decoder, or skip maps).
    """
    step = on_step or (lambda _msg: None)
    model = load_model(run_dir).eval()
    task = device_task(model)
    if model.runner.skip_maps is not None:
        raise ValueError("a run with skip maps cannot be exported yet: the edge runtime has no stand-in graphs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = model.num_layers
    wave = torch.randn(1, edge_runtime.SAMPLE_RATE)
    with torch.no_grad():  # not inference_mode: the exporter traces these tensors
        front = model.front_end(wave)
    axes = {"waveform": {0: "batch", 1: "samples"}, "hidden": {0: "batch", 1: "frames"},
            "features": {0: "batch", 1: "frames"}, "scores": {0: "batch"},
            "logits": {0: "batch", 1: "frames"} if task == "asr" else {0: "batch"}}
    per_k = model.strategy(DEVICE_STRATEGY).scorer.budget  # scores depend on k: one graph per k
    selectors = {k: f"selector_k{k:02d}.onnx" for k in range(1, L)} if per_k else {None: "selector.onnx"}
    fp32 = {"front_end": "front_end.onnx", "selector": list(selectors.values()) if per_k else selectors[None],
            "head": "head.onnx", "layers": [f"layer_{i:02d}.onnx" for i in range(L)]}
    step("front end")
    _export(_FrontEnd(model), wave, out / fp32["front_end"], "waveform", ["hidden", "features"], axes)
    for i in range(L):
        step(f"layer {i + 1}/{L}")
        _export(_Layer(model, i), front.hidden, out / fp32["layers"][i], "hidden", ["hidden_out"],
                {**axes, "hidden_out": {0: "batch", 1: "frames"}})
    step("selector, head")
    for k, name in selectors.items():
        _export(_Selector(model, k), front.features, out / name, "features", ["scores"], axes)
    depth = _depth_manifest(model)
    if depth:
        _export(_Depth(model), front.features, out / depth["graph"], "features", ["errors"], {**axes, "errors": {0: "batch"}})
    _export(_Head(model), front.hidden, out / fp32["head"], "hidden", ["logits"], axes)
    graphs = {"fp32": fp32}
    if int8:
        step("int8 quantization")
        q = {"front_end": fp32["front_end"], "selector": fp32["selector"], "head": "head.int8.onnx",
             "layers": [f"layer_{i:02d}.int8.onnx" for i in range(L)]}
        for src, dst in zip([fp32["head"], *fp32["layers"]], [q["head"], *q["layers"]]):
            _quantize(out / src, out / dst)
        graphs["int8"] = q
    manifest = {
        "format": edge_runtime.FORMAT, "source_run": str(Path(run_dir).resolve()), "task": task,
        "strategy": DEVICE_STRATEGY, "num_layers": L, "hidden_size": model.runner.hidden_size,
        **_answers(model, task), "sample_rate": edge_runtime.SAMPLE_RATE, "opset": OPSET, "graphs": graphs,
        **({"adaptive": depth} if depth else {}),
    }
    (out / edge_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.copyfile(edge_runtime.__file__, out / "edge_runtime.py")
    step("checking against torch")
    manifest["max_abs_diff_fp32"] = max_difference(run_dir, out)
    (out / edge_runtime.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
