"""A device's local round (client/learning.py) on either task: cached front ends on disk, selector
fine-tuning and evaluation, for keyword labels and for CTC transcripts of different lengths."""

from __future__ import annotations

import pytest
import torch

from ldfleet.client.learning import evaluate_selector, local_data, train_selector
from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("task", ["kws", "asr"])
def test_local_round_on_either_task(task, tmp_path):
    torch.manual_seed(0)
    model = DynamicModel(*with_head(load_backbone("tiny"), task)).eval()
    gen = torch.Generator().manual_seed(0)
    if task == "kws":
        items = [(torch.randn(16000, generator=gen), i % 12) for i in range(6)]  # class ids, as ClipDataset gives
    else:
        items = [(torch.randn(8000 + 2000 * i, generator=gen), t) for i, t in enumerate(["call bob", "stop", "one two"] * 2)]
    data = local_data(model, "f" * 16, tmp_path, lambda: (Items(items[:4]), Items(items[4:])))
    assert len(data.train) == 4 and len(data.test) == 2 and data.front_ms > 0
    assert (len(set(data.train.lengths().tolist())) == 1) == (task == "kws")  # clips of 1 s / of varied length
    again = local_data(model, "f" * 16, tmp_path, lambda: pytest.fail("the disk cache must be used"))
    assert again.train.texts == data.train.texts and torch.equal(again.train.hidden, data.train.hidden)
    before = {k: v.clone() for k, v in model.trainable_state("selector").items()}
    result = train_selector(model, data, 4, epochs=1, batch_size=2)
    assert result.mean_layers == pytest.approx(4.0)
    if task == "kws":
        assert 0.0 <= result.accuracy <= 1.0 and result.wer is None
    else:  # WER carried as WER (edits / reference words, >= 0), never as an accuracy
        assert result.accuracy is None and result.wer >= 0 and result.cer >= 0
        assert result.words == sum(len(t.split()) for _, t in items[:4])
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state("selector").items())
    ev = evaluate_selector(model, data, 2)
    assert ev.num_examples == 2 and ev.mean_layers == pytest.approx(2.0) and ev.loss > 0
    if task == "asr":
        from ldfleet.client.app import _metrics
        from ldfleet.client.learning import Budget
        from ldfleet.common import learning as L
        from ldfleet.server.validate_reply import check_metrics

        metrics = dict(_metrics(ev, Budget(k=2, num_layers=8, version=1), 0.1))
        assert L.M_ACCURACY not in metrics and metrics[L.M_WER] == pytest.approx(ev.wer)
        assert metrics[L.M_WORDS] == sum(len(t.split()) for _, t in items[4:])
        check_metrics(metrics, 8)  # the server accepts it
