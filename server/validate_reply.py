"""Every client reply of a federated round is checked before it counts.

A reply (a Flower ``RecordDict``) counts only when

* ``metrics`` holds ``num-examples``: an integer (an int, or a float with no fractional part)
  from 1 to ``max_examples`` (NaN, Inf, 1e308, negative, zero, 2.5 are refused);
* every metric is a finite int or float (or a list of them); ``layer-usage`` values are shares in
  [0, 1] with one entry per encoder layer when the layer count is known; ``wer`` and ``cer``
  (speech recognition) are >= 0; ``k``, ``policy-version`` and ``words`` are whole numbers >= 0;
* for training, ``arrays`` is a non-empty ArrayRecord whose names are among the global model's,
  each with the global array's shape and dtype and only finite values.

A refused reply raises ``BadReply`` with the reason; the strategy records it as the device's failure
for the round (registry and log) and leaves it out of the aggregate, so it never aborts a round and
never reaches the global model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from ldfleet.common import learning as L

#: Most examples one device may claim for one round (a weight above this is a bug or an attack).
MAX_EXAMPLES = 10_000_000


class BadReply(ValueError):
    """A reply refused by ``check_reply``; ``str(exc)`` is the reason."""


@dataclass
class CheckedReply:
    metrics: dict[str, Any]
    num_examples: int
    arrays: dict[str, np.ndarray] | None = None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_examples(value: Any, max_examples: int = MAX_EXAMPLES) -> int:
    """``num-examples`` as an int, or BadReply."""
    if not _is_number(value):
        raise BadReply(f"{L.M_EXAMPLES} is {type(value).__name__}, not a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadReply(f"{L.M_EXAMPLES} is {value!r}, not a finite number")
        if not value.is_integer():
            raise BadReply(f"{L.M_EXAMPLES} is {value!r}, not a whole number")
    if not 1 <= value <= max_examples:
        raise BadReply(f"{L.M_EXAMPLES} is {value:g}, outside 1..{max_examples}")
    return int(value)


def check_metrics(metrics: dict[str, Any], num_layers: int | None = None) -> None:
    """Every metric finite; shares in [0, 1]; counts whole and >= 0 (BadReply otherwise)."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for x in values:
            if not _is_number(x) or not math.isfinite(x):
                raise BadReply(f"metric {key!r} is not a finite number: {x!r}")
    usage = metrics.get(L.M_LAYER_USAGE)
    if usage is not None:
        if not isinstance(usage, list) or any(not 0.0 <= u <= 1.0 for u in usage):
            raise BadReply(f"metric {L.M_LAYER_USAGE!r} must be a list of shares in [0, 1]")
        if num_layers is not None and len(usage) != num_layers:
            raise BadReply(f"metric {L.M_LAYER_USAGE!r} has {len(usage)} entries, the model has {num_layers} layers")
    for key in (L.M_WER, L.M_CER):  # edits / reference length: >= 0, above 1 when hypotheses run long
        x = metrics.get(key)
        if x is not None and (isinstance(x, list) or x < 0):
            raise BadReply(f"metric {key!r} must be an error rate >= 0, got {x!r}")
    for key in (L.M_K, L.M_POLICY_VERSION, L.M_WORDS):
        x = metrics.get(key)
        if x is not None and (isinstance(x, list) or x < 0 or not float(x).is_integer() or x > 2**53):
            raise BadReply(f"metric {key!r} must be a whole number >= 0, got {x!r}")


def check_arrays(record: ArrayRecord, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reply's arrays as numpy, each named, shaped and typed as in ``template`` and finite."""
    if len(record) == 0:
        raise BadReply("train reply carries no arrays")
    foreign = sorted(set(record) - set(template))
    if foreign:
        raise BadReply(f"reply carries arrays outside the selector/head: {foreign[:2]}")
    out: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        want = template[name]
        try:
            value = arr.numpy()
        except Exception as exc:  # noqa: BLE001 - a corrupt buffer
            raise BadReply(f"array {name!r} cannot be decoded: {exc}") from None
        if value.shape != want.shape:
            raise BadReply(f"array {name!r} has shape {list(value.shape)}, expected {list(want.shape)}")
        if value.dtype != want.dtype:
            raise BadReply(f"array {name!r} has dtype {value.dtype}, expected {want.dtype}")
        if not np.all(np.isfinite(value)):
            raise BadReply(f"array {name!r} has non-finite values")
        out[name] = value
    return out


def check_reply(
    content: RecordDict,
    template: dict[str, np.ndarray],
    *,
    with_arrays: bool,
    num_layers: int | None = None,
    max_examples: int = MAX_EXAMPLES,
) -> CheckedReply:
    """Validate one reply's content (see the module docstring); BadReply with the reason otherwise."""
    if L.METRICS not in content.metric_records:
        raise BadReply("reply without metrics")
    metrics = dict(content.metric_records[L.METRICS])
    if L.M_EXAMPLES not in metrics:
        raise BadReply(f"reply without {L.M_EXAMPLES}")
    n = check_examples(metrics[L.M_EXAMPLES], max_examples)
    check_metrics(metrics, num_layers)
    arrays = None
    if with_arrays:
        if L.ARRAYS not in content.array_records:
            raise BadReply("train reply without arrays")
        arrays = check_arrays(content.array_records[L.ARRAYS], template)
    return CheckedReply(metrics, n, arrays)
