"""patch()/unpatch(): selection rules, the report, round trips, torch.compile;
the grouped keywords (prune=dict(...), keyword-only options) and the old flat
pruning keywords (still working, with a DeprecationWarning)."""
import warnings

import pytest
import torch
from torch import nn

import peft_ext
from helpers import toy
from peft_ext import OffloadPlan, Offloader
from peft_ext.nn import Int8Linear


def kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}


def test_default_patch_quantizes_all_but_head_and_reports():
    model = toy()
    x = torch.randn(2, 7, 64)
    ref = model(x)
    report = peft_ext.patch(model)
    k = kinds(model)
    assert k["lm_head"] == "Linear" and k["tiny"] == "Linear"
    assert all(v == "Int8Linear" for n, v in k.items() if n.startswith("layers."))
    assert len(report) == 8
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["lm_head"].startswith("excluded")
    assert reasons["tiny"].startswith("too small")
    assert report.bytes_after < report.bytes_before / 3
    text = str(report)
    assert "layers.0.q_proj" in text and "Int8Linear[dynamic]" in text and "replaced 8 module(s)" in text
    cos = nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_target_modules_follow_peft_rules():
    model = toy()
    report = peft_ext.patch(model, target_modules=["q_proj", "layers.1.v_proj"])
    assert sorted(r.name for r in report.replaced) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    model = toy()
    report = peft_ext.patch(model, quantize="int8_weight_only", target_modules=r"layers\.\d\.mlp\.\d")
    assert sorted(r.name for r in report.replaced) == [f"layers.{i}.mlp.{j}" for i in (0, 1) for j in (0, 2)]
    assert all(r.new_type == "Int8Linear[weight_only]" for r in report.replaced)
    # a regex must match the whole name, a list entry a whole dotted suffix
    assert len(peft_ext.patch(toy(), target_modules="proj")) == 0
    assert len(peft_ext.patch(toy(), target_modules=["_proj"])) == 0


def test_exclude_and_filter_fn():
    model = toy()
    report = peft_ext.patch(model, exclude_modules=["v_proj", "lm_head"],
                            filter_fn=lambda name, m: m.out_features != 256)
    names = {r.name for r in report.replaced}
    assert names == {"layers.0.q_proj", "layers.1.q_proj", "layers.0.mlp.2", "layers.1.mlp.2"}
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["layers.0.mlp.0"] == "rejected by filter_fn"


def test_unsupported_dtype_and_bad_mode():
    model = toy().double()
    report = peft_ext.patch(model)
    assert len(report) == 0
    assert all("unsupported dtype" in s.reason for s in report.skipped if s.name.startswith("layers"))
    with pytest.raises(ValueError, match="quantize"):
        peft_ext.patch(toy(), quantize="int4")
    with pytest.raises(ValueError, match="model itself"):
        peft_ext.patch(nn.Linear(64, 64))


def test_shared_module_is_swapped_everywhere():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = peft_ext.patch(model)
    assert len(report) == 1
    assert model[0] is model[2] and isinstance(model[0], Int8Linear)


def test_unpatch_restores_names_keys_and_outputs():
    model = toy()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(3, 64)
    before = model(x)
    peft_ext.patch(model, quantize="int8_weight_only")
    patched = model(x)
    report = peft_ext.unpatch(model)
    assert len(report) == 8
    assert all(t == "Linear" for t in kinds(model).values())
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    torch.testing.assert_close(model(x), patched, atol=1e-4, rtol=1e-4)
    assert nn.functional.cosine_similarity(model(x).flatten(), before.flatten(), dim=0) > 0.999


def test_gpt2_conv1d_is_patched_and_restored():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        report = peft_ext.patch(model)
        after = model(ids).logits
    assert len(report) == 8  # c_attn, c_proj, c_fc, c_proj per layer
    assert {s.name: s.reason for s in report.skipped}["lm_head"].startswith("excluded")
    assert nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99
    peft_ext.unpatch(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        restored = model(ids).logits
    assert nn.functional.cosine_similarity(restored.flatten(), before.flatten(), dim=0) > 0.99


def test_output_head_found_without_the_name():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    report = peft_ext.patch(model, exclude_modules=None)
    assert {s.name: s.reason for s in report.skipped}["lm_head"] == "output head"


@pytest.mark.parametrize("quantize", ["int8", "int8_weight_only"])
def test_torch_compile_fullgraph(quantize):
    model = toy().eval()
    peft_ext.patch(model, quantize=quantize)
    x = torch.randn(2, 5, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


# ---- the grouped keywords: prune=dict(...), keyword-only options, old flat keywords

def module_types(model):
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
    assert module_types(new) == module_types(old)
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
