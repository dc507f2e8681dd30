"""The adaptive strategy's depth chooser (common/model/depth.py): predicted errors per depth, one
calibrated lambda per mean depth, a depth per input, the selector's sets at that depth, saving and
loading; confident exit and the depth table (the training stage that fits them: tests/test_asr.py)."""

import pytest
import torch

from ldfleet.common.model.backbone import load_backbone
from ldfleet.common.model.depth import calibrated_lambda, fit_error_predictor, lagrange_depths
from ldfleet.common.model.dynamic import DynamicModel
from ldfleet.common.model.heads import with_head
from ldfleet.common.model.selector import pooled_features


def test_edit_predictor_learns_which_clips_are_hard():
    torch.manual_seed(0)
    pooled = torch.randn(300, 6)
    hard = pooled[:, 0] > pooled[:, 1]
    edits = torch.stack([torch.where(hard, 4.0, 1.0), torch.where(hard, 2.0, 0.0)], dim=1)  # [N, L=2]
    net, info = fit_error_predictor(pooled, torch.full((300,), 50), torch.poisson(edits), epochs=30, folds=3)
    assert info["cv_loss"] < info["cv_loss_first_epoch"]
    test = torch.randn(200, 6)
    with torch.no_grad():
        pred = net(test, torch.full((200,), 50))
    truly_hard = test[:, 0] > test[:, 1]
    assert float(pred[truly_hard, 1].mean()) > 3 * float(pred[~truly_hard, 1].mean())


def test_the_predictor_sees_the_length_of_a_clip():
    torch.manual_seed(0)
    frames = torch.randint(25, 250, (300,))
    edits = torch.poisson((frames.float() / 50).unsqueeze(1).expand(300, 2).contiguous())  # more words, more edits
    net, _ = fit_error_predictor(torch.randn(300, 6), frames, edits, epochs=30, folds=3)
    with torch.no_grad():
        short, long = (net(torch.randn(100, 6), torch.full((100,), n)).mean() for n in (40, 220))
    assert float(long) > 2.5 * float(short)


def test_a_lambda_calibrated_on_some_clips_sets_depths_one_clip_at_a_time():
    cost = torch.tensor([[3.0, 0.5, 0.0, 0.0], [9.0, 6.0, 3.0, 0.0]])  # an easy clip and a hard one
    lam = calibrated_lambda(cost, mean_layers=3.0)
    assert lagrange_depths(cost, lam).tolist() == [2, 4]  # the hard clip gets every layer
    assert lagrange_depths(cost[1:], lam).tolist() == [4]  # the same depth alone
    assert lagrange_depths(cost, lam + 3.0).float().mean() < 3.0  # a dearer layer (past the hard clip's 3 edits per layer): fewer layers


def test_with_durations_the_budget_is_a_mean_weighted_by_length_and_long_clips_pay_more_per_layer():
    cost = torch.tensor([[6.0, 3.0, 1.0, 0.0]] * 2)  # two clips alike but for their length
    weights = torch.tensor([0.5, 1.5])  # frames over the mean length
    lam = calibrated_lambda(cost, mean_layers=2.5, weights=weights)
    d = lagrange_depths(cost, lam, weights)
    assert float((d * weights).sum() / weights.sum()) <= 2.5
    assert int(d[0]) > int(d[1])  # the same errors are cheaper to remove on the short clip
    assert len(set(lagrange_depths(cost, lam).tolist())) == 1  # unweighted: one depth for both
    short = torch.tensor([0.05, 1.0, 1.95])  # a very short clip pays little per layer, yet a budget of one layer holds
    assert lagrange_depths(cost[:1].expand(3, -1), calibrated_lambda(cost[:1].expand(3, -1), 1.0, short), short).tolist() == [1, 1, 1]


def test_a_fitted_and_calibrated_chooser_gives_hard_clips_more_layers_within_each_mean_budget():
    torch.manual_seed(0)
    pooled = torch.randn(400, 6)
    hardness = pooled[:, 0].sigmoid() * 6  # errors fall with depth, faster for easy clips
    depths = torch.arange(1, 5, dtype=torch.float)
    errors = torch.poisson(hardness.unsqueeze(1) * (4 - depths) / 3 + 0.05)  # [N, L=4]
    chooser, _ = fit_error_predictor(pooled[:300], torch.full((300,), 50), errors[:300], epochs=40, folds=3)
    with pytest.raises(ValueError, match="no fitted depth chooser"):
        chooser.depths(pooled, 2, frames=torch.full((400,), 50))
    chooser.calibrate(pooled[300:], frames=torch.full((100,), 50))  # held-out clips of one length
    means = []
    for k in (1, 2, 3):
        d = chooser.depths(pooled[300:], k, frames=torch.full((100,), 50))
        assert 1 <= int(d.min()) and int(d.max()) <= 4 and float(d.float().mean()) <= k
        means.append(float(d.float().mean()))
        hard = hardness[300:] > hardness[300:].median()
        assert float(d[hard].float().mean()) >= float(d[~hard].float().mean())
    assert means == sorted(means) and means[-1] > 2.5  # a bigger budget is spent, not left unused
    assert chooser.depths(pooled, 4, frames=torch.full((400,), 50)).tolist() == [4] * 400  # a mean of every layer: every layer
    assert chooser.macs() == 7 * 64 + 64 * 4  # pooled [6] and the length -> 64 -> 4 depths


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DynamicModel(*with_head(load_backbone("tiny", "wavlm")), selector_budget=True, static_budget=True).eval()


@torch.no_grad()
def test_adaptive_runs_the_selectors_set_at_each_inputs_own_depth(model):
    wave = torch.randn(12, 16000) * torch.linspace(0.05, 3.0, 12).unsqueeze(1)
    front = model.front_end(wave)
    with pytest.raises(ValueError, match="ldfleet train"):
        model.choose(front, "adaptive", 4)
    with pytest.raises(TypeError, match="DynamicModel.choose"):
        model.strategy("adaptive").choose(front, 4)
    pooled, frames = pooled_features(front.features, front.frame_mask), torch.full((12,), front.hidden.shape[1])
    hard = torch.arange(12) >= 6  # the louder clips, say, lose more from every missing layer
    errors = hard.float().unsqueeze(1) * (model.num_layers - torch.arange(1, model.num_layers + 1)).float() * 2
    with torch.enable_grad():
        fitted, _ = fit_error_predictor(pooled, frames, errors, epochs=80, folds=3)
    chooser = model.strategy("adaptive").chooser
    chooser.load_state_dict(fitted.state_dict())
    chooser.calibrate(pooled, frames)
    keep = model.choose(front, "adaptive", 4)
    depth = keep.sum(1)
    assert float(depth.float().mean()) <= 4 and float(depth[hard].float().mean()) > float(depth[~hard].float().mean())
    for i, d in enumerate(depth.tolist()):  # the selector's own set at that depth
        assert torch.equal(keep[i], model.choose(front, "selector", d)[i])
    out = model.classify(front, "adaptive", 4)
    assert torch.equal(out.keep, keep) and out.logits.shape == (12, 12)
    assert model.choose(front, "adaptive", model.num_layers).all()


def test_the_chooser_is_saved_with_the_run_and_an_older_run_loads_without_one(model, tmp_path):
    from ldfleet.common.model.checkpoint import load_model, save_model

    chooser = model.strategy("adaptive").chooser
    chooser.calibrate(torch.randn(20, 2 * model.runner.hidden_size), torch.randint(10, 90, (20,)))
    save_model(model, tmp_path / "run")
    again = load_model(tmp_path / "run").strategy("adaptive").chooser
    assert again.is_fitted and torch.equal(again.lambdas, chooser.lambdas) and torch.equal(again.ref_frames, chooser.ref_frames)
    older = {k: v for k, v in model.state_dict().items() if ".chooser." not in k and ".confident_exit." not in k}
    fresh = DynamicModel(*with_head(load_backbone("tiny", "wavlm")), selector_budget=True, static_budget=True)
    fresh.load_state_dict(older)  # strict
    assert not fresh.strategy("adaptive").chooser.is_fitted and not fresh.strategy("confident_exit").is_fitted
    assert not any("chooser" in k for k in model.trainable_state("selector"))  # not exchanged in FL


@torch.no_grad()
def test_a_depth_table_holds_each_clips_errors_confidence_and_kept_set_at_every_depth(model):
    from ldfleet.common.depth_fit import depth_table
    from ldfleet.common.front_cache import FrontEndCache

    wave = torch.randn(5, 16000) * torch.linspace(0.1, 2.0, 5).unsqueeze(1)
    front = model.front_end(wave)
    labels = model.head_for("selector").labels
    texts = [labels[i % len(labels)] for i in range(5)]
    cache = FrontEndCache.pack(front.hidden, front.features, front.frame_mask, texts)
    table = depth_table(model, cache, torch.tensor([4, 0, 2]), "selector", batch_size=2)
    L = model.num_layers
    assert table.errors.shape == table.confidence.shape == (3, L) and table.sets.shape == (3, L, L)
    assert table.sets.sum(2).tolist() == [list(range(1, L + 1))] * 3  # d layers at depth d
    assert ((table.confidence > 0) & (table.confidence <= 1)).all()
    for row, clip in enumerate([4, 0, 2]):  # the same as running the clip alone, with the selector's head
        one = front.select(torch.tensor([clip]))
        for d in (1, L // 2, L):
            out = model.classify(one, "selector", d)
            assert torch.equal(table.sets[row, d - 1], out.keep[0])
            assert float(table.errors[row, d - 1]) == float(model.head_for("selector").decode(out.logits, None)[0] != texts[clip])
    assert table.frames.tolist() == [front.hidden.shape[1]] * 3


@torch.no_grad()
def test_confident_exit_stops_each_input_at_its_first_confident_exit_within_a_mean_budget(model):
    wave = torch.randn(10, 16000) * torch.linspace(0.05, 3.0, 10).unsqueeze(1)
    front = model.front_end(wave)
    L, head = model.num_layers, model.head_for("early_exit")
    with pytest.raises(ValueError, match="ldfleet train"):
        model.run(front, "confident_exit", 4)
    with pytest.raises(TypeError, match="DynamicModel.run"):
        model.choose(front, "confident_exit", 4)
    conf = torch.stack([head.confidence(model.classify(front, "early_exit", d).logits, None) for d in range(1, L + 1)], 1)
    exits = model.strategy("confident_exit")
    exits.calibrate(conf)
    for k in (2, 4, 6):
        out = model.classify(front, "confident_exit", k)
        depth = out.keep.sum(1)
        assert float(depth.float().mean()) <= k
        assert torch.equal(out.keep, torch.arange(L).unsqueeze(0) < depth.unsqueeze(1))  # the first layers, in order
        assert torch.equal(conf.gather(1, (depth - 1).unsqueeze(1)).squeeze(1) >= exits.threshold(k), depth < L)
        for i, d in enumerate(depth.tolist()):  # as if early exit had been asked for that input's depth
            assert torch.allclose(out.logits[i], model.classify(front, "early_exit", d).logits[i], atol=1e-5)
    assert model.classify(front, "confident_exit", L).keep.all()  # a mean of every layer: every layer
    weights = torch.linspace(0.2, 1.8, 10)  # long clips cost more per layer: a duration-weighted budget
    exits.calibrate(conf, weights)
    depth = model.classify(front, "confident_exit", 3).keep.sum(1).float()
    assert float((depth * weights).sum() / weights.sum()) <= 3
