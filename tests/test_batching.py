"""Batches cut to a memory budget: one long clip among short ones gets a batch of its own, short
clips keep their batches, and outputs computed batch by batch equal those of one clip at a time."""

from __future__ import annotations

import torch

from ldfleet.common.batching import INFERENCE, TRAINING, MemoryBudget, budgeted_batches, rows_within, split_to_budget
from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head
from ldfleet.common.front_cache import FrontEndCache, add_teacher, cache_front_ends
from ldfleet.common.train import length_batches

SECOND = 16000


def test_short_clips_keep_their_batches_and_a_long_one_is_cut_out():
    short = [4 * SECOND] * 128  # the synthetic corpora: at most 4 s
    assert [len(b) for b in budgeted_batches(short, 64)] == [64, 64]
    lengths = [3 * SECOND] * 40 + [60 * SECOND] + [3 * SECOND] * 23
    batches = budgeted_batches(lengths, 64)
    assert torch.cat(batches).tolist() == list(range(64))  # order kept: outputs concatenate as before
    (long,) = [b.tolist() for b in batches if 40 in b.tolist()]
    assert long[0] == 40 and len(long) <= 2  # the 60 s clip with at most one other (2 x 3000^2 frames^2 fit)
    for b in batches:
        assert INFERENCE.fits(len(b), max(lengths[i] for i in b.tolist()))
    assert [len(p) for p in split_to_budget(torch.arange(5), [60 * SECOND] * 5, INFERENCE)] == [2, 2, 1]
    tiny = MemoryBudget(attention=1e12, samples=10 * SECOND)  # only the samples cap binds: 10 s per batch
    assert [b.tolist() for b in split_to_budget(torch.arange(5), [4 * SECOND] * 5, tiny)] == [[0, 1], [2, 3], [4]]


def test_training_batches_are_cut_tighter_and_still_cover_every_clip_once():
    lengths = torch.tensor([2 * SECOND] * 60 + [30 * SECOND] * 4)
    batches = length_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(64))
    for b in batches:
        assert TRAINING.fits(len(b), int(lengths[b].max()))
    assert max(len(b) for b in batches if int(lengths[b].max()) == 30 * SECOND) < 4
    assert rows_within(INFERENCE, 60 * SECOND, 64) == 2 and rows_within(TRAINING, 60 * SECOND, 16) == 1 and rows_within(INFERENCE, 2 * SECOND, 64) == 64


class _Clips(torch.utils.data.Dataset):
    def __init__(self, seconds: list[float]):
        gen = torch.Generator().manual_seed(0)
        self.waves = [0.1 * torch.randn(int(s * SECOND), generator=gen) for s in seconds]
        self.texts = ["yes"] * len(seconds)

    @property
    def lengths(self) -> list[int]:
        return [len(w) for w in self.waves]

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i):
        return self.waves[i], self.texts[i]


def test_a_cache_and_its_teacher_with_a_long_clip_equal_one_clip_at_a_time():
    model = DynamicModel(*with_head(load_backbone("tiny"), "asr")).eval()
    data = _Clips([1.0, 0.5, 45.0, 0.8])  # 45 s: over the budget with any other clip
    cache = cache_front_ends(model, data, batch_size=4)
    add_teacher(model, cache, batch_size=4)
    lengths = cache.lengths().tolist()
    for i in range(len(data)):
        alone = cache_front_ends(model, _Subset(data, i), batch_size=1)
        frames = lengths[i]
        assert frames == alone.lengths().item()
        mine, _ = cache.batch(torch.tensor([i]))
        theirs, _ = alone.batch(torch.tensor([0]))
        torch.testing.assert_close(mine.hidden, theirs.hidden, atol=1e-4, rtol=1e-4)
        add_teacher(model, alone)
        torch.testing.assert_close(cache.teacher_logits(torch.tensor([i]), frames), alone.teacher_logits(torch.tensor([0]), frames),
                                   atol=1e-4, rtol=1e-4)
    assert isinstance(cache, FrontEndCache) and cache.sample_lengths().tolist() == [n * 320 for n in lengths]
    # packed: memory follows the total length, not 4 x the 45 s clip
    assert cache.hidden.shape[0] == sum(lengths) < 2 * max(lengths)


def test_a_packed_cache_gives_the_batches_a_padded_one_gave():
    """The packed cache's batches equal those of the padded layout it replaced, on the real frames,
    and the model's outputs on them are the same."""
    model = DynamicModel(*with_head(load_backbone("tiny"), "asr")).eval()
    data = _Clips([1.0, 0.5, 2.0, 0.8, 1.2])
    from ldfleet.common.data.loading import pad_batch

    wave, mask, texts = pad_batch([data[i] for i in range(len(data))])
    with torch.inference_mode():
        front = model.front_end(wave, mask)
        cache = FrontEndCache.pack(front.hidden, front.features, front.frame_mask, texts)
        for rows in (torch.tensor([0, 2, 4]), torch.tensor([3, 1]), torch.tensor([2])):
            got, _ = cache.batch(rows)
            t = int(got.lengths().max())
            want_mask = front.frame_mask[rows, :t]
            assert got.frame_mask is None if bool(want_mask.all()) else torch.equal(got.frame_mask, want_mask)
            real = want_mask.unsqueeze(-1)
            assert torch.equal(got.hidden * real, front.hidden[rows, :t] * real)
            out = model.runner.run_layers(got, None)
            ref = model.runner.run_layers(type(got)(front.hidden[rows, :t], front.features[rows, :t], got.frame_mask), None)
            assert torch.equal(out * real, ref * real)


class _Subset(_Clips):
    def __init__(self, data: _Clips, i: int):
        self.waves, self.texts = [data.waves[i]], [data.texts[i]]
