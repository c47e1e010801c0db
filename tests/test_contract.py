"""patch()/unpatch() against the models, hooks, dtypes and ties people already
have (issue 9 items 3, 4, 10, 11, 12, 16, 22): hostile model-level tests."""
import copy
import pickle

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext.nn import Int8Linear
from helpers import toy


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclass_with_its_own_forward_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(3, 64)
    before = model(x)
    report = peft_ext.patch(model, exclude_modules=None)
    assert type(model[0]) is Scaled and isinstance(model[2], Int8Linear)
    assert "overrides forward" in {s.name: s.reason for s in report.skipped}["0"]
    assert nn.functional.cosine_similarity(model(x).flatten(), before.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_still_runs(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)  # eval + no_grad + batch_first takes torch's fused fast path
    report = peft_ext.patch(model, exclude_modules=None)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "reads its weight directly" in reasons["layers.0.self_attn.out_proj"]
    assert "reads its weight directly" in reasons["layers.1.linear1"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    model.train()
    model(x).sum().backward()  # the slow path too


def test_multihead_attention_and_decoder_layer():
    torch.manual_seed(0)
    model = nn.Transformer(64, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128,
                           dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    before = model(src, tgt)
    report = peft_ext.patch(model, exclude_modules=None)
    after = model(src, tgt)
    assert nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.999
    assert isinstance(model.decoder.layers[0].linear1, Int8Linear)  # no fast path reads it
    assert all(not isinstance(m.out_proj, Int8Linear) for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert len(report) > 0


# --- HF peft adapters (item 4) ---

class FakeLoraLayer(nn.Module):
    """The shape of peft's tuner layers: base_layer plus adapter ModuleDicts;
    its merge adds into base_layer.weight like peft's does."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base, r=8):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight)
        base.requires_grad_(False)

    def get_base_layer(self):
        return self.base_layer

    def merge(self, safe_merge=False, adapter_names=None):
        delta = self.lora_B["default"].weight @ self.lora_A["default"].weight
        self.base_layer.weight.data += delta

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def lora_toy():
    model = toy()
    for block in model.layers:
        block.q_proj = FakeLoraLayer(block.q_proj)
        block.v_proj = FakeLoraLayer(block.v_proj)
    return model


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_peft_adapters_are_left_alone_and_trainable():
    model = lora_toy()
    before = trainable(model)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    report = peft_ext.patch(model, min_params=1)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n} == adapters
    reasons = {s.name: s.reason for s in report.skipped}
    assert "peft adapter" in reasons["layers.0.q_proj.lora_A.default"]
    assert isinstance(model.layers[0].q_proj.base_layer, Int8Linear)  # QLoRA-style: the base is quantized
    assert trainable(model) <= before and trainable(model) >= sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    x = torch.randn(2, 64)
    model(x).sum().backward()
    assert model.layers[0].q_proj.lora_A["default"].weight.grad is not None


def test_merge_after_patch_fails_clearly_and_works_after_unpatch():
    model = lora_toy()
    peft_ext.patch(model)
    with pytest.raises(RuntimeError, match=r"unpatch\(model\)"):
        model.layers[0].q_proj.merge()
    peft_ext.unpatch(model)
    model.layers[0].q_proj.merge()  # plain float base layer again: peft's merge works


def test_real_peft_lora_model():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415  (optional: skipped without peft)

    model = get_peft_model(toy(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    before = trainable(model)
    report = peft_ext.patch(model)
    assert trainable(model) == before  # the adapters stay trainable
    assert any("peft adapter" in s.reason for s in report.skipped)
    assert type(model.base_model.model.layers[0].q_proj.base_layer) is Int8Linear
    x = torch.randn(2, 64)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"unpatch\(model\)"):
        model.merge_and_unload()
    peft_ext.unpatch(model)
    merged = model.merge_and_unload()
    assert isinstance(merged.layers[0].q_proj, nn.Linear)


# --- dtypes, flags, ties (items 10, 11) ---

def test_unpatch_keeps_bias_free_bfloat16_layers_bfloat16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False)).bfloat16()
    peft_ext.patch(model, exclude_modules=None)
    peft_ext.unpatch(model)
    assert all(m.weight.dtype == torch.bfloat16 for m in model if isinstance(m, nn.Linear))
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_unpatch_keeps_a_frozen_model_frozen():
    model = toy().requires_grad_(False)
    peft_ext.patch(model, quantize="int8_weight_only")
    peft_ext.unpatch(model)
    assert not any(p.requires_grad for p in model.parameters())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_stay_tied_and_count_once():
    torch.manual_seed(0)
    model = Tied()
    x = torch.randn(3, 64)
    before = model(x)
    report = peft_ext.patch(model)
    assert len(report) == 2
    assert model.a.weight is model.b.weight and model.a.weight_scale is model.b.weight_scale
    assert report.bytes_before == 64 * 64 * 4 + 2 * 64 * 4
    assert report.bytes_after == 64 * 64 + 64 * 4 + 2 * 64 * 4
    assert f"{report.bytes_before / report.bytes_after:.2f}x smaller" in str(report)
    assert nn.functional.cosine_similarity(model(x).flatten(), before.flatten(), dim=0) > 0.999
    peft_ext.unpatch(model)
    assert model.a.weight is model.b.weight
    assert len(list(model.parameters())) == 3


def test_weight_tied_to_a_module_left_alone_is_not_quantized():
    model = Tied()
    report = peft_ext.patch(model, exclude_modules=["b"])
    reasons = {s.name: s.reason for s in report.skipped}
    assert "shared with 'b'" in reasons["a"]
    assert type(model.a) is nn.Linear and model.a.weight is model.b.weight


# --- hooks (item 12) ---

def test_forward_hooks_and_pre_hooks_are_carried_over_and_back():
    model = toy()
    layer = model.layers[0].q_proj
    calls = []
    pre = layer.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__)))
    post = layer.register_forward_hook(lambda m, args, out: calls.append(("post", type(m).__name__)))
    kw = layer.register_forward_hook(lambda m, args, kwargs, out: calls.append(("kw", type(m).__name__)),
                                     with_kwargs=True)
    peft_ext.patch(model)
    model(torch.randn(2, 64))
    assert calls == [("pre", "Int8Linear"), ("post", "Int8Linear"), ("kw", "Int8Linear")]
    calls.clear()
    peft_ext.unpatch(model)
    model(torch.randn(2, 64))
    assert calls == [("pre", "Linear"), ("post", "Linear"), ("kw", "Linear")]
    pre.remove(), post.remove(), kw.remove()  # the handles still work
    calls.clear()
    model(torch.randn(2, 64))
    assert calls == []


# --- validation before any change (item 16), the empty report (item 22) ---

@pytest.mark.parametrize("offload, error", [
    (dict(device="bogus"), ValueError), (dict(prefetch=0), ValueError),
    (dict(device="cpu", max_resident_bytes=-1), ValueError), (dict(devcie="cpu"), TypeError),
    ("cpu", TypeError)])
def test_bad_offload_options_leave_the_model_unchanged(offload, error):
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        peft_ext.patch(model, offload=offload)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_report_says_nothing_was_replaced():
    report = peft_ext.patch(toy(), target_modules=["nothing"])
    assert len(report) == 0
    assert "nan" not in str(report)
    assert "nan" not in str(peft_ext.PatchReport())


@pytest.mark.parametrize("strict", [True, False])
def test_float_checkpoint_into_a_patched_model_raises_naming_the_key(strict):
    model = toy()
    float_sd = toy().state_dict()
    peft_ext.patch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"'layers\.0\.q_proj\.weight' has dtype torch\.float32"):
        model.load_state_dict(float_sd, strict=strict)
    int8_keys = [k for k, v in before.items() if v.dtype == torch.int8]
    assert int8_keys and all(torch.equal(before[k], model.state_dict()[k]) for k in int8_keys)


def test_patched_peft_model_deepcopies_and_pickles_with_the_merge_guard():
    model = lora_toy()
    peft_ext.patch(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(RuntimeError, match=r"unpatch\(model\)"):
            clone.layers[1].v_proj.merge()
        x = torch.randn(2, 64)
        torch.testing.assert_close(clone(x), model(x))
