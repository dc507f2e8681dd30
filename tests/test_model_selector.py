"""Selector, top-k gates and the five layer-choice strategies."""

import pytest
import torch

from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head
from ldfleet.common.model.selector import LayerSelector, straight_through_topk, topk_mask
from ldfleet.common.model.strategies import STRATEGY_NAMES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DynamicModel(*with_head(load_backbone("tiny", "wavlm"))).eval()


def test_topk_mask_keeps_the_k_best():
    scores = torch.tensor([[0.1, 0.9, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]])
    assert topk_mask(scores, 2).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_straight_through_is_hard_forward_and_differentiable_backward():
    scores = torch.randn(5, 8, requires_grad=True)
    gates = straight_through_topk(scores, 3)
    assert torch.allclose(gates, gates.round(), atol=1e-6)
    assert (gates.round().sum(1) == 3).all()
    (gates * torch.arange(8.0)).sum().backward()
    # pushing weight onto later layers must raise their scores' gradient signal
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert (scores.grad[:, -1] >= scores.grad[:, 0]).float().mean() > 0.5


def test_straight_through_keeps_everything_when_k_equals_layers():
    assert torch.equal(straight_through_topk(torch.randn(2, 4), 4), torch.ones(2, 4))


def test_selector_scores_depend_on_the_input():
    sel = LayerSelector(feature_dim=16, num_layers=6, hidden=8)
    a, b = torch.randn(1, 20, 16), torch.randn(1, 20, 16) * 3 + 1
    assert not torch.allclose(sel(a), sel(b))
    # padding frames must not change the scores of the real frames
    padded = torch.cat([a, torch.randn(1, 10, 16) * 100], dim=1)
    mask = torch.tensor([[True] * 20 + [False] * 10])
    assert torch.allclose(sel(a), sel(padded, mask), atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75, 1.0])
def test_every_strategy_runs_exactly_k_layers(model, keep):
    wave = torch.randn(6, 16000)
    k = model.k_for(keep)
    for name in STRATEGY_NAMES:
        if name in ("adaptive", "confident_exit"):  # a mean of k layers: tests/test_model_depth.py
            continue
        out = model(wave, strategy=name, keep=keep)
        expected = model.num_layers if name == "full" else k
        assert out.keep.sum(1).tolist() == [expected] * 6, name
        assert out.logits.shape == (6, 12)


@torch.inference_mode()
def test_strategy_shapes_of_choice(model):
    wave = torch.randn(16, 16000)
    early = model(wave, strategy="early_exit", keep=0.5).keep
    assert early[:, : model.k_for(0.5)].all() and not early[:, model.k_for(0.5) :].any()
    static = model(wave, strategy="static", keep=0.5).keep
    assert (static == static[0]).all()  # one mask for every input
    rand = model(wave, strategy="random", keep=0.5).keep
    assert len({tuple(r.tolist()) for r in rand}) > 1  # layers differ between inputs


def test_unknown_strategy_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown strategy"):
        model.strategy("oracle")


def test_trainable_state_is_only_selector_and_its_head(model):
    state = model.trainable_state("selector")
    assert state and all(k.startswith(("strategies.selector.", "heads.selector.")) for k in state)
    # parameters only: the exchanged key set is what it was before selectors had a (buffer) prior
    params = {n for n, _ in model.named_parameters()}
    assert set(state) <= params and "strategies.selector.scorer.prior" not in state
    assert not any(v.requires_grad for v in state.values())
    assert sum(v.numel() for v in state.values()) < 0.05 * model.parameter_count("backbone")


def test_budget_conditioned_selector_ranks_per_budget():
    torch.manual_seed(0)
    sel = LayerSelector(feature_dim=16, num_layers=6, hidden=8, budget=True)
    feats = torch.randn(3, 10, 16)
    assert not torch.allclose(sel(feats, None, 2), sel(feats, None, 5))
    with pytest.raises(ValueError, match="needs k"):
        sel(feats)


def test_selector_started_from_static_ranks_like_it_then_learns_corrections():
    torch.manual_seed(0)
    sel = LayerSelector(feature_dim=16, num_layers=6, hidden=8, budget=True)
    static = torch.randn(7, 6)
    sel.start_from(static)
    feats = torch.randn(3, 10, 16)
    for k in (2, 4):
        assert torch.equal(sel(feats, None, k), static[k].expand(3, -1))
    with pytest.raises(ValueError, match="expected"):
        sel.start_from(torch.zeros(6))
    # the zeroed output layer still learns (its input is not zero), so corrections can grow
    sel(feats, None, 3).pow(2).sum().backward()
    assert sel.mlp[-1].weight.grad.abs().sum() > 0


def test_selector_saved_without_a_prior_loads_with_a_zero_one():
    torch.manual_seed(0)
    old = LayerSelector(feature_dim=16, num_layers=6, hidden=8)
    state = {k: v for k, v in old.state_dict().items() if k != "prior"}  # a run saved before priors
    new = LayerSelector(feature_dim=16, num_layers=6, hidden=8)
    new.load_state_dict(state)  # strict: no complaint about the missing prior, which stays zero
    assert torch.equal(new.prior, torch.zeros(6))
    assert torch.equal(new(torch.ones(1, 4, 16)), old(torch.ones(1, 4, 16)))
    new.prior.fill_(3.0)
    new.load_state_dict(state, strict=False)  # a partial load (global arrays) keeps the local prior
    assert torch.equal(new.prior, torch.full((6,), 3.0))
    with pytest.raises(RuntimeError, match="mlp.0.weight"):  # other missing keys still fail a strict load
        new.load_state_dict({k: v for k, v in state.items() if k != "mlp.0.weight"})


def test_oracle_supervision_picks_each_inputs_lowest_loss_set():
    from ldfleet.common.train import oracle_keep

    torch.manual_seed(0)
    model = DynamicModel(*with_head(load_backbone("tiny", "wavlm"), "asr")).eval()
    head = model.heads["base"]
    front = model.front_end(torch.randn(3, 8000))
    targets = head.targets(["call bob", "stop", "dial one two"])
    best = oracle_keep(model, front, targets, 3, 4, torch.Generator().manual_seed(5))
    assert best.sum(1).tolist() == [3, 3, 3]
    gen = torch.Generator().manual_seed(5)  # the same candidates, scored by hand
    losses = []
    for _ in range(4):
        keep = torch.zeros(3, 8, dtype=torch.bool)
        keep[:, torch.randperm(8, generator=gen)[:3]] = True
        with torch.no_grad():
            losses.append((keep, head.example_losses(head.logits(model.runner.run_layers(front, keep), None), None, targets)))
    for row in range(3):
        keep, _ = min(losses, key=lambda kl: float(kl[1][row]))
        assert torch.equal(best[row], keep[row])


def test_distillation_loss_is_zero_only_for_the_teachers_outputs():
    from ldfleet.common.model.heads import CTCHead

    head = CTCHead(8)
    teacher = torch.randn(2, 5, len(head.vocab))
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert float(head.distill_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(head.distill_loss(torch.randn_like(teacher), teacher, mask)) > 0.01


def test_oracle_candidates_are_distinct_k_sets():
    from ldfleet.common.evaluate import oracle_candidates

    cands = oracle_candidates(8, 3, 16, seed=1)
    assert cands.shape == (16, 8) and (cands.sum(1) == 3).all()
    assert len({tuple(c.tolist()) for c in cands}) == 16
    assert oracle_candidates(4, 3, 16).shape[0] == 4  # only C(4,3) = 4 sets exist


def test_corrections_stay_on_only_at_the_budgets_where_they_beat_the_ranking():
    """A fitted budget selector whose corrections lose at k=1, win at k=2 and tie at k=3 on validation
    keeps them only at k=2; elsewhere it chooses the static ranking's set."""
    from ldfleet.common.model.selector import StaticScores
    from ldfleet.common.set_fit import LossTable, keep_corrections_that_help, layer_sets

    torch.manual_seed(0)
    static = StaticScores(num_layers=4, budget=True)
    with torch.no_grad():
        for k in (1, 2, 3):
            static.scores[k, :k] = torch.arange(k, 0, -1.0)  # the ranking keeps the first k layers
    sel = LayerSelector(feature_dim=1, num_layers=4, hidden=4, budget=True)
    sel.start_from(static.scores.detach().clone())
    with torch.no_grad():
        sel.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # the corrections always add layer 3
    sets = {k: layer_sets(4, k) for k in (1, 2, 3)}

    def losses(k: int, with_3: float, ranking: float) -> torch.Tensor:
        row = torch.full((len(sets[k]),), 5.0)
        row[(sets[k] == torch.arange(4).lt(k)).all(1)] = ranking
        row[(sets[k] == (torch.arange(4).lt(k - 1) | (torch.arange(4) == 3))).all(1)] = with_3
        return row.expand(6, -1).clone()

    val = LossTable(torch.randn(6, 2), {1: losses(1, 2.0, 1.0), 2: losses(2, 0.5, 1.0), 3: losses(3, 1.0, 1.0)}, sets)
    out = keep_corrections_that_help(sel, static, val, val)
    assert out["corrected"] == {1: False, 2: True, 3: False}
    assert out["val_chosen_loss"] == {1: 1.0, 2: 0.5, 3: 1.0}
    feats = torch.randn(2, 5, 1)
    assert topk_mask(sel(feats, None, 1), 1).tolist() == [[True, False, False, False]] * 2
    assert topk_mask(sel(feats, None, 2), 2).tolist() == [[True, False, False, True]] * 2
    assert [sel.uses_input(k) for k in (1, 2, 3)] == [False, True, False]  # what eval counts the selector's MACs by
    state = sel.state_dict()  # the switch is saved with the selector and survives a reload
    again = LayerSelector(feature_dim=1, num_layers=4, hidden=4, budget=True)
    again.load_state_dict(state)
    assert again.corrected.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    older = LayerSelector(feature_dim=1, num_layers=4, hidden=4, budget=True)  # a run saved before the switch
    older.load_state_dict({k: v for k, v in state.items() if k != "corrected"})  # loads strictly: corrections everywhere
    assert older.corrected.tolist() == [1.0] * 5
    again.start_from(static.scores.detach().clone())  # a new fit starts with corrections everywhere
    assert again.corrected.tolist() == [1.0] * 5
