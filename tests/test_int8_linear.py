"""Int8Linear as a module: conversion, dtype moves, serialization, training."""
import copy
import pickle

import pytest
import torch
from torch import nn

from helpers import ISAS
from peft_ext import ops, reference as ref
from peft_ext.nn import Int8Linear


def linear(k=40, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_reference_and_float(mode, bias):
    lin = linear(bias=bias)
    q = Int8Linear.from_linear(lin, mode=mode)
    assert not isinstance(q, nn.Linear)
    assert (q.in_features, q.out_features) == (40, 24)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert "weight" in dict(q.named_buffers()) and "weight" not in dict(q.named_parameters())
    x = torch.randn(3, 5, 40)
    fn = ref.int8_linear if mode == "dynamic" else ref.int8_linear_weight_only
    torch.testing.assert_close(q(x), fn(x, q.weight, q.weight_scale, q.bias))
    cos = torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), dim=0)
    assert cos > 0.999


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear.from_linear(linear(), mode="int4")


def test_to_linear_round_trip():
    lin = linear()
    back = Int8Linear.from_linear(lin).to_linear()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, lin.weight, atol=lin.weight.abs().max().item() / 127, rtol=0)
    torch.testing.assert_close(back.bias, lin.bias)


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_half_precision_sets_compute_dtype_and_keeps_scales(cast):
    q = getattr(Int8Linear.from_linear(linear(), mode="dynamic"), cast)()
    dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
    assert q.weight.dtype == torch.int8
    assert q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == dtype
    y = q(torch.randn(2, 40, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    q = q.to(torch.float32)
    assert q.bias.dtype == torch.float32 and q.weight_scale.dtype == torch.float32


def test_deepcopy_pickle_and_state_dict(tmp_path):
    q = Int8Linear.from_linear(linear(), mode="weight_only")
    x = torch.randn(4, 40)
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        torch.testing.assert_close(clone(x), q(x))
        assert clone.mode == "weight_only"
    path = tmp_path / "sd.pt"
    torch.save(q.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == {"weight", "weight_scale", "bias"}
    fresh = Int8Linear(40, 24, mode="weight_only")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), q(x))


def test_fine_tuning_through_frozen_int8_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model[2] = Int8Linear.from_linear(model[2])
    x = torch.randn(256, 16)
    y = torch.randint(0, 4, (256,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    weight_before = model[2].weight.clone()
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model[0].weight.grad is not None and model[2].bias.grad is not None
    assert torch.equal(model[2].weight, weight_before)


# --- the state-dict, dtype and device contract (issue 9 items 5, 10, 11, 22) ---

@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("bad", [torch.float32, torch.uint8, torch.bfloat16])
def test_load_refuses_a_weight_that_is_not_int8(strict, bad):
    q = Int8Linear.from_linear(linear())
    before = {k: v.clone() for k, v in q.state_dict().items()}
    sd = dict(q.state_dict())
    sd["weight"] = linear(seed=1).weight.detach().to(bad)  # a float checkpoint's weight beside a valid scale
    with pytest.raises(RuntimeError, match=r"weight.*int8"):
        q.load_state_dict(sd, strict=strict)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # nothing overwritten


@pytest.mark.parametrize("strict", [True, False])
def test_load_refuses_a_float_checkpoint(strict):
    q = Int8Linear.from_linear(linear())
    before = q.weight.clone()
    with pytest.raises(RuntimeError, match=r"'weight'.*float32.*from_linear"):
        q.load_state_dict(linear(seed=1).state_dict(), strict=strict)  # no weight_scale at all
    assert torch.equal(q.weight, before)


def test_load_refuses_an_int8_weight_without_its_scale():
    q = Int8Linear.from_linear(linear())
    sd = {"weight": q.weight.clone(), "bias": q.bias.detach().clone()}
    with pytest.raises(RuntimeError, match="weight_scale"):
        q.load_state_dict(sd, strict=False)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_load_accepts_minus_128(isa, mode):
    q = Int8Linear.from_linear(linear(), mode=mode)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    sd["weight"][0, 0] = -128
    q.load_state_dict(sd)
    assert q.weight[0, 0] == -128
    x = torch.randn(3, 40)
    fn = ref.int8_linear if mode == "dynamic" else ref.int8_linear_weight_only
    torch.testing.assert_close(q(x), fn(x, q.weight, q.weight_scale, q.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_free_half_layer_keeps_its_dtype(dtype):
    lin = linear(bias=False).to(dtype)
    q = Int8Linear.from_linear(lin)
    assert q.compute_dtype == dtype
    back = q.to_linear()
    assert back.weight.dtype == dtype
    assert back(torch.randn(2, 40, dtype=dtype)).dtype == dtype
    assert Int8Linear.from_linear(linear(bias=False)).bfloat16().to_linear().weight.dtype == torch.bfloat16
    assert q.float().to_linear().weight.dtype == torch.float32


def test_to_linear_restores_requires_grad():
    lin = linear().requires_grad_(False)
    back = Int8Linear.from_linear(lin).to_linear()
    assert not back.weight.requires_grad and not back.bias.requires_grad
    lin = linear()
    lin.bias.requires_grad_(False)
    back = Int8Linear.from_linear(lin).to_linear()
    assert back.weight.requires_grad and not back.bias.requires_grad


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_float64_input_after_double(mode):
    q = Int8Linear.from_linear(linear(), mode=mode).double()
    assert q.compute_dtype == torch.float64
    x = torch.randn(3, 40, dtype=torch.float64)
    y = q(x)
    assert y.dtype == torch.float64
    fn = ref.int8_linear if mode == "dynamic" else ref.int8_linear_weight_only
    torch.testing.assert_close(y, fn(x.float(), q.weight, q.weight_scale, q.bias.float()).double(),
                               atol=1e-5, rtol=1e-5)  # float32 arithmetic inside
    assert q.to_linear().weight.dtype == torch.float64


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_meta_input_with_cpu_weights_raises(mode):
    q = Int8Linear.from_linear(linear(), mode=mode)
    with pytest.raises(RuntimeError, match="meta"):
        q(torch.randn(2, 40, device="meta"))
    meta = Int8Linear(40, 24, mode=mode, device="meta")  # a meta module with meta input: shapes only
    assert meta(torch.randn(2, 40, device="meta")).shape == (2, 24)


def _packed_ok(q):
    # The prepacked copy exists, is for this weight, and is not in the state dict.
    assert q._packed is not None and q._packed_key == q._weight_key()
    assert set(q.state_dict()) <= {"weight", "weight_scale", "bias"}
    assert "_packed" not in dict(q.named_buffers())


def test_dynamic_mode_prepacks_and_stays_exact(isa):
    q = Int8Linear.from_linear(linear(k=70, n=37))
    _packed_ok(q)
    n, k = q.weight.shape
    assert q._packed.numel() == 64 + 3 * 16 * 4 * ((k + 3) // 4) + 4 * 48
    x = torch.randn(9, 70)
    assert torch.equal(q(x), ref.int8_linear(x, q.weight, q.weight_scale, q.bias))
    assert Int8Linear.from_linear(linear(), mode="weight_only")._packed is None


def test_packed_weight_follows_weight_changes(isa):
    q = Int8Linear.from_linear(linear())
    x = torch.randn(10, 40)
    # In place (load_state_dict copies into the buffer; so does this).
    q.weight.copy_(torch.randint(-128, 128, q.weight.shape, dtype=torch.int8))
    assert torch.equal(q(x), ref.int8_linear(x, q.weight, q.weight_scale, q.bias))
    _packed_ok(q)
    # A new tensor.
    q.weight = torch.randint(-128, 128, q.weight.shape, dtype=torch.int8)
    assert torch.equal(q(x), ref.int8_linear(x, q.weight, q.weight_scale, q.bias))
    # load_state_dict repacks at load time.
    other = Int8Linear.from_linear(linear(seed=3))
    q.load_state_dict(other.state_dict())
    _packed_ok(q)
    assert torch.equal(q(x), other(x))
    # .to() / dtype moves, deepcopy and pickle.
    for moved in (q.bfloat16().float(), copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert torch.equal(moved(x), ref.int8_linear(x, q.weight, q.weight_scale, q.bias))
        _packed_ok(moved)


def test_packed_survives_a_tier_change():
    q = Int8Linear.from_linear(linear(k=100, n=33))
    x = torch.randn(12, 100)
    expected = ref.int8_linear(x, q.weight, q.weight_scale, q.bias)
    before = ops.build_info()["cpu_isa"]
    try:
        for name in ISAS:
            ops.set_cpu_isa(name)
            assert torch.equal(q(x), expected), name
    finally:
        ops.set_cpu_isa(before)


def test_prepack_can_be_turned_off():
    q = Int8Linear.from_linear(linear())
    q.prepack = False
    q._repack()
    x = torch.randn(9, 40)
    assert q._packed is None
    assert torch.equal(q(x), ref.int8_linear(x, q.weight, q.weight_scale, q.bias))
