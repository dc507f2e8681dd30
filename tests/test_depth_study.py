"""The depth study's parts (simulations/depth_study.py): allocation under a mean budget, confident
exits, escalation to every layer, the edit predictor. The study itself needs a trained speech-recognition run (README)."""

import pytest
import torch

from ldfleet.common.model.depth import exit_threshold, first_confident
from ldfleet.simulations.depth_study import (allocate, best_cascade, cascade, escalation, escalation_threshold,
                                             shared_prefix)


def test_allocate_gives_the_layers_to_the_clips_that_lose_most_without_them():
    # two easy clips (no edits from k=2 on) and two hard ones (edits fall until k=4), 4 layers
    cost = torch.tensor([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [9.0, 6.0, 3.0, 0.0], [9.0, 6.0, 3.0, 0.0]])
    k = allocate(cost, mean_layers=3.0)
    assert k.tolist() == [2, 2, 4, 4]  # a uniform k=3 would cost 6 edits, this costs none
    assert float(k.float().mean()) <= 3.0
    tight = allocate(cost, mean_layers=2.0)
    assert float(tight.float().mean()) == 2.0  # ties in cost per layer: any spending of 4 more layers
    assert float(cost.gather(1, (tight - 1).unsqueeze(1)).sum()) == 24 - 3 * 4


def test_allocate_stops_when_no_layer_lowers_a_cost():
    cost = torch.tensor([[4.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    assert allocate(cost, 3.0).tolist() == [3, 1]  # the second clip gains nothing from depth
    with pytest.raises(ValueError):
        allocate(cost, 0.5)


def test_first_confident_exits_at_the_first_layer_over_the_threshold_and_the_threshold_fits_the_budget():
    conf = torch.tensor([[0.9, 0.95, 0.99], [0.2, 0.6, 0.7], [0.1, 0.2, 0.3]])
    assert first_confident(conf, 0.5).tolist() == [1, 2, 3]  # no exit: every layer
    t = exit_threshold(conf, mean_layers=2.0)
    assert float(first_confident(conf, t).float().mean()) <= 2.0
    assert float(first_confident(conf, t + 0.05).float().mean()) > 2.0  # the highest such threshold: later exits overspend
    assert first_confident(conf, t).tolist() == [1, 2, 3]


def test_cascade_escalates_the_least_confident_clips_within_the_budget():
    conf = torch.tensor([[0.9, 0.0, 0.0], [0.2, 0.0, 0.0], [0.5, 0.0, 0.0], [0.95, 0.0, 0.0]])
    k = cascade(conf, mean_layers=1.5, k1=1, k2=3)  # a quarter of the clips can go from 1 to 3 layers
    assert k.tolist() == [1, 3, 1, 1] and float(k.float().mean()) == 1.5
    edits = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # 1 -> 2 escalates both unsure clips and fixes both; 1 -> 3 can afford only the least sure one
    assert best_cascade(edits, conf, torch.ones(4), mean_layers=1.5) == (1, 2)
    assert best_cascade(edits, conf, torch.ones(4), mean_layers=3.0) is None  # no deeper k2 to go on to


def test_a_second_run_reuses_the_layers_two_sets_share_before_they_differ():
    a = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    full = torch.ones(4, 4, dtype=torch.bool)
    assert shared_prefix(a, full).tolist() == [2, 0, 4, 1]
    assert shared_prefix(a, a).tolist() == a.sum(1).tolist()  # the same set: all of it


def test_escalation_sends_unsure_clips_on_to_every_layer_and_counts_the_layers_it_runs_again():
    L = 4
    sets = torch.zeros(3, L, L, dtype=torch.bool)
    for d in range(1, L + 1):
        sets[:, d - 1, L - d:] = True  # depth d keeps the last d layers: nothing shared with the full set's prefix ...
    sets[2, 1] = torch.tensor([True, True, False, False])  # ... but clip 2's depth-2 set is the full set's first two
    depths = torch.tensor([2, 2, 2])
    conf = torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.2, 0.0, 0.0]])
    k, run = escalation(depths, conf, sets, threshold=0.5)
    assert k.tolist() == [2, 4, 4]
    assert run.tolist() == [2.0, 2.0 + 4, 2.0 + 2]  # clip 2 goes on from its shared prefix
    t = escalation_threshold(depths, conf, sets, torch.ones(3), mean_layers=3.5)
    assert 0.2 < t < 0.31  # the cheap escalation fits (mean 8/3), both would not (12/3)
    assert escalation(depths, conf, sets, t)[0].tolist() == [2, 2, 4]
