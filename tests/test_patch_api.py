"""patch()'s grouped keywords: prune=dict(...), keyword-only options, and the
old flat pruning keywords (still working, with a DeprecationWarning)."""
import warnings

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext import OffloadPlan, Offloader
from helpers import toy


def kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


def run_equal(a, b):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


@pytest.mark.parametrize("options", [dict(sparsity=0.5, pattern="2:4"),
                                     dict(sparsity=0.75, pattern="block", block=(16, 16)),
                                     dict(sparsity=0.5, pattern="unstructured", score="magnitude")])
def test_prune_dict_matches_the_old_flat_keywords(options):
    new, old = toy(), toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grouped form warns about nothing
        report = peft_ext.patch(new, prune=options)
    with pytest.warns(DeprecationWarning, match="prune=dict"):
        old_report = peft_ext.patch(old, **options)
    assert kinds(new) == kinds(old)
    assert str(report) == str(old_report)
    assert report.pruned is not None and len(report.pruned) == len(old_report.pruned)
    run_equal(new, old)


def test_prune_dict_with_quantize_and_defaults():
    model = toy()
    report = peft_ext.patch(model, "int8_weight_only", prune={})  # prune()'s defaults: 50%, 2:4
    assert report.pruned.sparsity == pytest.approx(0.5)
    assert all(r.new_type == "Int8Linear[weight_only]" for r in report.replaced)


def test_options_after_quantize_are_keyword_only():
    with pytest.raises(TypeError):
        peft_ext.patch(toy(), "int8", ["q_proj"])


def test_bad_prune_options_name_the_problem():
    with pytest.raises(TypeError, match="unexpected keyword"):
        peft_ext.patch(toy(), sparsty=0.5)
    with pytest.raises(TypeError, match="prune must be a dict"):
        peft_ext.patch(toy(), prune=0.5)
    with pytest.raises(ValueError, match="target_modules"):
        peft_ext.patch(toy(), prune=dict(sparsity=0.5, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="prune=dict"), pytest.warns(DeprecationWarning):
        peft_ext.patch(toy(), prune=dict(sparsity=0.5), sparsity=0.5)
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity"):
        peft_ext.patch(model, prune=dict(sparsity=1.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not peft_ext.SparseLinear for m in model.modules())


def test_old_pattern_without_sparsity_still_means_no_pruning():
    model = toy()
    with pytest.warns(DeprecationWarning):
        report = peft_ext.patch(model, pattern="block")
    assert report.pruned is None
    assert all(r.new_type == "Int8Linear[dynamic]" for r in report.replaced)


def test_offload_types_are_exported():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).requires_grad_(False)
    report = peft_ext.patch(model, min_params=1, exclude_modules=None,
                            offload=dict(device="cpu", max_resident_bytes=20_000))
    assert isinstance(report.offload, Offloader)
    model(torch.randn(2, 64))
    assert isinstance(report.offload.plan, OffloadPlan)
    report.offload.remove()
