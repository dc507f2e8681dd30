"""The routing study's parts (simulations/routing_study.py): candidates, routers, the routed choice.
The study itself needs a trained speech-recognition run (README, speech recognition)."""

import torch

from ldfleet.common.model.runner import FrontEnd
from ldfleet.common.set_fit import LossTable, layer_sets
from ldfleet.simulations.routing_study import (
    RoutedChoice, TableRouter, cluster_routing, fit_router, greedy_candidates, on_validation_table,
)


def test_greedy_candidates_add_the_set_that_helps_the_clips_the_first_one_fails():
    losses = torch.tensor([[0.0, 1.0, 4.0], [0.0, 1.0, 4.0], [0.5, 1.0, 4.0], [4.0, 1.2, 0.0]])
    assert greedy_candidates(losses, 1) == [1]  # lowest mean loss
    assert greedy_candidates(losses, 2) == [1, 0]  # the best pair: mean of min 0.425 (with 2: 0.75)
    assert greedy_candidates(losses, 5) == [1, 0, 2]  # no more than there are sets


def test_table_router_learns_a_split_the_features_predict():
    torch.manual_seed(0)

    def table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.randn(n, 4)
        second_better = pooled[:, 0] > pooled[:, 1]  # survives the router's layer norm (a sign alone would not)
        return pooled, torch.stack([second_better.float(), (~second_better).float()], dim=1)  # [n, R=2]

    router = TableRouter(dim=4, num_layers=4, r=2)
    start = table(64)[0]
    assert router(start, 2).eq(0).all()  # starts as static: candidate 0 for every clip
    epoch = fit_router(router, {2: table(256)}, {2: table(64)}, epochs=40)
    assert epoch >= 0
    pooled, losses = table(200)
    routed = router(pooled, 2)
    assert float(losses.gather(1, routed.unsqueeze(1)).mean()) < 0.1  # the right candidate for > 90% of new clips


def test_cluster_routing_gives_each_cluster_its_own_best_set():
    torch.manual_seed(0)
    sets = {1: layer_sets(3, 1)}  # {0}, {1}, {2}
    pooled = torch.cat([torch.randn(40, 2) + 8.0, torch.randn(40, 2) - 8.0])
    losses = torch.ones(80, 3)
    losses[:40, 2] = 0.0  # the first cluster is best served by layer 2, the second by layer 0
    losses[40:, 0] = 0.0
    train = LossTable(pooled, {1: losses}, sets)
    candidates, route, info = cluster_routing(train, r=2)
    assert sorted(info["cluster_sizes"]) == [40, 40]
    chosen = candidates[1][route(pooled, 1)]  # [80, 3]
    assert chosen[:40, 2].all() and chosen[40:, 0].all()
    val = on_validation_table(train, train, candidates, route)
    assert val[1]["routed"] == 0.0 and val[1]["static"] > 0.0 and val[1]["routed_share"] == [0.5, 0.5]


def test_routed_choice_keeps_the_routed_candidate_and_every_layer_at_full_budget():
    candidates = {2: torch.tensor([[True, True, False, False], [False, False, True, True]])}
    choice = RoutedChoice(4, candidates, lambda pooled, k: (pooled[:, 0] > 0).long())
    features = torch.stack([torch.ones(3, 2), -torch.ones(3, 2)])  # [B=2, T=3, D=2]
    front = FrontEnd(torch.zeros(2, 3, 2), features, None)
    assert choice.choose(front, 2).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert choice.choose(front, 4).all()
