"""The int8 ops against peft_ext.reference on fresh random inputs of odd shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_ext import ops, reference as ref
from helpers import ISAS, make_int8 as make, sqnr_db, tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (1, 37, 5), (2, 31, 3), (3, 33, 13), (17, 100, 7), (33, 257, 65), (130, 64, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_matches_reference(isa, shape, dtype):
    x, _, _, _ = make(*shape, dtype)
    q, s = ops.quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, sr)
    # Multiplying by 1/scale can land a hair off a rounding tie; never more.
    assert (q.int() - qr.int()).abs().max() <= 1
    assert (q != qr).float().mean() < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_reference(isa, shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = torch.full((shape[0], shape[2]), float("nan"))
    out = ops.int8_linear(x, q, s, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2])
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out, ref.int8_linear(x, q, s, b), **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES + [(48, 70, 11), (49, 70, 11), (256, 70, 11), (257, 70, 11)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_reference(isa, shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = ops.int8_linear_weight_only(x, q, s, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2])
    torch.testing.assert_close(out, ref.int8_linear_weight_only(x, q, s, b), **tol(dtype))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_both_modes(m, k, n, seed):
    x, q, s, b = make(m, k, n, seed=seed)
    torch.testing.assert_close(ops.int8_linear(x, q, s, b), ref.int8_linear(x, q, s, b), **tol(torch.float32))
    torch.testing.assert_close(ops.int8_linear_weight_only(x, q, s, b),
                               ref.int8_linear_weight_only(x, q, s, b), **tol(torch.float32))


@pytest.mark.parametrize("k", [1, 31, 32, 64, 4096 + 17])
def test_integer_sums_are_exact_at_the_extremes(isa, k):
    # Every activation and weight at +-127 with scales of 1: the largest
    # products vpmaddubsw can see. Any int16 saturation would show here.
    g = torch.Generator().manual_seed(k)
    sign_x = torch.randint(0, 2, (5, k), generator=g) * 2 - 1
    sign_w = torch.randint(0, 2, (7, k), generator=g) * 2 - 1
    x = (127 * sign_x).float()
    w = (127 * sign_w).to(torch.int8)
    out = ops.int8_linear(x, w, torch.ones(7), None)
    exact = (x.double() @ w.double().t())
    assert torch.equal(out.double(), exact)
    x_mixed = torch.randint(-127, 128, (5, k), generator=g).float()
    x_mixed[:, 0] = 127  # scale 1, so quantization is the identity
    w_mixed = torch.randint(-127, 128, (7, k), generator=g).to(torch.int8)
    out = ops.int8_linear(x_mixed, w_mixed, torch.ones(7), None)
    assert torch.equal(out.double(), x_mixed.double() @ w_mixed.double().t())


def test_3d_and_non_contiguous_inputs(isa):
    x, q, s, b = make(24, 50, 9)
    x3 = x.reshape(2, 3, 4, 50)
    for fn, rf in [(ops.int8_linear, ref.int8_linear), (ops.int8_linear_weight_only, ref.int8_linear_weight_only)]:
        out = fn(x3, q, s, b)
        assert out.shape == (2, 3, 4, 9)
        torch.testing.assert_close(out, rf(x3, q, s, b), **tol(torch.float32))
        wide = torch.randn(24, 100)
        view = wide[:, ::2]
        assert not view.is_contiguous()
        torch.testing.assert_close(fn(view, q, s, b), rf(view.contiguous(), q, s, b), **tol(torch.float32))
        xt = torch.randn(50, 24).t()
        torch.testing.assert_close(fn(xt, q, s, b), rf(xt.contiguous(), q, s, b), **tol(torch.float32))


def test_zero_rows_give_no_nan(isa):
    w = torch.randn(6, 40)
    w[2] = 0
    q, s = ops.quantize_weight(w)
    assert s[2] == 0 and (q[2] == 0).all()
    x = torch.randn(3, 40)
    x[1] = 0
    b = torch.randn(6)
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        out = fn(x, q, s, b)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 2], b[2].expand(3))
        torch.testing.assert_close(out[1], b)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 1024), (torch.bfloat16, 4096)])
def test_sqnr_against_float64(dtype, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, k, generator=g, dtype=torch.float64)
    w = torch.randn(512, k, generator=g, dtype=torch.float64)
    exact = x @ w.t()
    q, s = ops.quantize_weight(w.float())
    dyn = sqnr_db(exact, ops.int8_linear(x.to(dtype), q, s))
    wo = sqnr_db(exact, ops.int8_linear_weight_only(x.to(dtype), q, s))
    assert dyn >= 30, dyn
    assert wo >= 35, wo


def test_dequantize_matches_reference():
    _, q, s, _ = make(1, 77, 19)
    for dtype in DTYPES:
        torch.testing.assert_close(ops.int8_dequantize(q, s, dtype), ref.int8_dequantize(q, s, dtype))


def test_gradients_flow_to_input_and_bias():
    x, q, s, b = make(6, 45, 10)
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        xg = x.clone().requires_grad_()
        bg = b.clone().requires_grad_()
        y = fn(xg.reshape(2, 3, 45), q, s, bg)
        gy = torch.randn_like(y)
        y.backward(gy)
        w = ref.int8_dequantize(q, s)
        torch.testing.assert_close(xg.grad, (gy.reshape(6, 10) @ w), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bg.grad, gy.reshape(6, 10).sum(0))


@pytest.mark.parametrize("op", ["int8_linear", "int8_linear_weight_only"])
def test_opcheck_linear(op):
    x, q, s, b = make(5, 33, 7)
    fn = getattr(torch.ops.peft_ext, op).default
    torch.library.opcheck(fn, (x, q, s, b))
    torch.library.opcheck(fn, (x.reshape(5, 1, 33).requires_grad_(), q, s, b.requires_grad_()))
    torch.library.opcheck(fn, (x.bfloat16(), q, s, None))


def test_opcheck_quantize_and_dequantize():
    x, q, s, _ = make(4, 19, 3)
    torch.library.opcheck(torch.ops.peft_ext.quantize_per_token.default, (x.reshape(2, 2, 19),))
    torch.library.opcheck(torch.ops.peft_ext.int8_dequantize.default, (q, s, torch.bfloat16))


def test_clear_errors():
    x, q, s, b = make(3, 16, 4)
    cases = [
        (TypeError, "x must be float32", (x.double(), q, s, b)),
        (TypeError, "x must be float32", (x.int(), q, s, b)),
        (TypeError, "weight must be int8", (x, q.float(), s, b)),
        (TypeError, "weight_scale must be float32", (x, q, s.double(), b)),
        (ValueError, "in_features=16", (torch.randn(3, 15), q, s, b)),
        (ValueError, "weight_scale must have shape", (x, q, s[:3], b)),
        (ValueError, "bias must have shape", (x, q, s, b[:2])),
        (ValueError, "weight must be 2-D", (x, q.reshape(4, 4, 4), s, b)),
        (ValueError, "weight must be contiguous", (x, torch.zeros(16, 4, dtype=torch.int8).t(), s, b)),
    ]
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        for exc, msg, args in cases:
            with pytest.raises(exc, match=msg):
                fn(*args)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.quantize_per_token(torch.ones(3, dtype=torch.int64))


def test_k_overflow_guard():
    # The one bound (C++ kMaxExactK), read from the library: weights may hold
    # -128, so |products| <= 128 * 127 and the largest exact K is 132104.
    k_max = int(ops.build_info()["max_exact_k"])
    assert k_max == (2**31 - 1) // (128 * 127)
    assert ops.int8_linear(torch.randn(1, k_max), torch.ones(1, k_max, dtype=torch.int8), torch.ones(1)).isfinite().all()
    k = k_max + 1
    q = torch.ones(1, k, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflow"):
        ops.int8_linear(torch.randn(1, k), q, torch.ones(1))
    # weight-only accumulates in float and has no such limit
    assert torch.isfinite(ops.int8_linear_weight_only(torch.randn(1, k), q, torch.ones(1))).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 70, 21), (5, 70, 21), (40, 333, 50)])
def test_w8a8_is_bitwise_the_reference(isa, dtype, shape):
    # Same integer sums, same float operation order in the epilogue: the
    # kernels (dot-product and packed paths, vector and scalar stores) must
    # reproduce the reference exactly.
    x, q, s, b = make(*shape, dtype)
    assert torch.equal(ops.int8_linear(x, q, s, b), ref.int8_linear(x, q, s, b))


@pytest.mark.parametrize("m", [1, 9])
def test_empty_in_features_gives_bias(isa, m):
    q = torch.zeros(5, 0, dtype=torch.int8)
    b = torch.randn(5)
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        torch.testing.assert_close(fn(torch.randn(m, 0), q, torch.ones(5), b), b.expand(m, 5))
        assert (fn(torch.randn(m, 0), q, torch.ones(5), None) == 0).all()


# ---- issue 9 #1/#2: non-finite and tiny rows; issue 11: tiers, -128, packing

def _w8a8_paths(x, q, s, b):
    """W8A8 through the plain-weight op and the prepacked op."""
    return [ops.int8_linear(x, q, s, b), ops.int8_linear_packed(x, q, s, b, ops.int8_pack_weight(q))]


@pytest.mark.parametrize("m", [1, 5, 9, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_give_nan_rows(isa, m, dtype):
    x, q, s, b = make(m, 77, 21, dtype)
    bad = {0: float("nan"), m // 2: float("inf"), m - 1: float("-inf")}
    for row, v in bad.items():
        x[row, (row * 7) % 77] = v
    qx, sx = ops.quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert torch.equal(qx, qr)
    torch.testing.assert_close(sx, sr, equal_nan=True, atol=0, rtol=0)
    rows = torch.tensor(sorted(bad))
    good = torch.ones(m, dtype=torch.bool)
    good[rows] = False
    assert torch.isnan(sx[rows]).all() and (qx[rows] == 0).all()
    expected = ref.int8_linear(x, q, s, b)
    for out in _w8a8_paths(x, q, s, b):
        assert torch.isnan(out[rows].float()).all(), out[rows]
        assert torch.equal(out[good], expected[good])
    wo = ops.int8_linear_weight_only(x, q, s, b)
    assert not torch.isfinite(wo[rows].float()).any()
    assert torch.isfinite(wo[good].float()).all()


@pytest.mark.parametrize("tiny", [1e-30, 1e-37, 1e-38, 3e-39, 1e-40, 1e-44])
def test_tiny_absmax_rows_quantize_normally(isa, tiny):
    x, q, s, b = make(6, 130, 17, bias=False)
    x[1:4] *= tiny / x[1:4].abs().amax(dim=1, keepdim=True)
    qx, sx = ops.quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert torch.equal(qx, qr) and torch.equal(sx, sr)
    # The same rows at unit scale: the int8 values must agree up to the
    # rounding of a denormal scale, so the relative error stays that of int8.
    exact = x.double() @ ref.int8_dequantize(q, s).double().t()
    for out in _w8a8_paths(x, q, s, None):
        assert torch.equal(out, ref.int8_linear(x, q, s, None))
        err = (out[1:4].double() - exact[1:4]).norm() / exact[1:4].norm()
        if tiny >= 1e-38:
            assert err < 0.05, err
        elif tiny >= 1e-40:  # a denormal scale has fewer bits: coarser, still bounded
            assert err < 0.5, err
        else:  # the scale underflows to 0: q 0, output = bias (0 here), never NaN
            assert (out[1:4] == 0).all()


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 33, 13), (17, 100, 7), (33, 257, 65), (130, 64, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_is_bitwise_the_reference(isa, shape, dtype):
    x, _, _, _ = make(*shape, dtype)
    q, s = ops.quantize_per_token(x)
    qr, sr = ref.quantize_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 13])
@pytest.mark.parametrize("k", [1, 33, 4096 + 17])
def test_weight_minus_128_is_exact(isa, m, k):
    # Weights from elsewhere may hold -128; sign tricks that negate the weight
    # wrap it, so every tier and path must give the exact integer sums.
    g = torch.Generator().manual_seed(m * 7919 + k)
    x = (127 * (torch.randint(0, 2, (m, k), generator=g) * 2 - 1)).float()
    w = torch.randint(-128, 128, (37, k), generator=g).to(torch.int8)
    w[:5] = -128
    w[5, : k // 2] = 127
    exact = x.double() @ w.double().t()
    for out in _w8a8_paths(x, w, torch.ones(37), None):
        assert torch.equal(out.double(), exact)


@pytest.mark.parametrize("m", [1, 9])
def test_largest_exact_k(isa, m):
    # 128 * 127 * K at the largest K whose sums still fit int32: the VNNI
    # formulation's (q + 128) * w sums wrap on the way and must come back exact.
    k = (2**31 - 1) // (128 * 127)
    x = torch.full((m, k), 127.0)
    x[:, 1::2] = -127.0 if m > 1 else 127.0
    w = torch.full((3, k), -128, dtype=torch.int8)
    w[1, ::3] = 127
    # Column 0 sums to -128 * 127 * K = -2**10 * 2097151, exact in float32;
    # the others round like the reference's exact sum does.
    expected = ref.int8_linear(x, w, torch.ones(3), None)
    assert expected[0, 0] == -128 * 127 * k * (1 if m == 1 else 0) or m > 1
    for out in _w8a8_paths(x, w, torch.ones(3), None):
        assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES + [(8, 70, 33), (61, 129, 64), (7, 4, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_is_bitwise_the_reference(isa, shape, dtype):
    x, q, s, b = make(*shape, dtype)
    packed = ops.int8_pack_weight(q)
    assert packed.dtype == torch.int8 and packed.dim() == 1
    assert torch.equal(ops.int8_linear_packed(x, q, s, b, packed), ref.int8_linear(x, q, s, b))
    assert torch.equal(ops.int8_linear_packed(x, q, s, None, packed), ref.int8_linear(x, q, s, None))


def test_packed_bytes_are_the_same_on_every_tier():
    _, q, _, _ = make(1, 301, 45)
    before = ops.build_info()["cpu_isa"]
    try:
        packs = []
        for name in ISAS:
            ops.set_cpu_isa(name)
            packs.append(ops.int8_pack_weight(q))
    finally:
        ops.set_cpu_isa(before)
    assert all(torch.equal(p, packs[0]) for p in packs)
    # ~1 byte per weight: 16-column panels of 4-k groups, plus header and column sums.
    n, k = q.shape
    assert packs[0].numel() == 64 + 3 * 16 * 4 * ((k + 3) // 4) + 4 * 48


def test_packed_refuses_what_it_was_not_made_for():
    x, q, s, b = make(3, 40, 20)
    packed = ops.int8_pack_weight(q)
    other = ops.int8_pack_weight(q[:, :39].contiguous())
    with pytest.raises(ValueError, match="not made by int8_pack_weight"):
        ops.int8_linear_packed(x, q, s, b, other)
    with pytest.raises(ValueError, match="not made by int8_pack_weight"):
        ops.int8_linear_packed(x, q, s, b, torch.zeros_like(packed))
    with pytest.raises(TypeError, match="packed must be int8"):
        ops.int8_linear_packed(x, q, s, b, packed.view(torch.uint8))
    changed = q.clone()
    changed.neg_()
    with pytest.raises(ValueError, match="weight changed after packing"):
        ops.int8_linear_packed(x, changed, s, b, packed)
    with pytest.raises(TypeError, match="weight must be int8"):
        ops.int8_pack_weight(q.float())


def test_packed_opcheck_and_gradients():
    x, q, s, b = make(5, 33, 7)
    packed = ops.int8_pack_weight(q)
    fn = torch.ops.peft_ext.int8_linear_packed.default
    torch.library.opcheck(fn, (x, q, s, b, packed))
    torch.library.opcheck(fn, (x.requires_grad_(), q, s, b.requires_grad_(), packed))
    torch.library.opcheck(torch.ops.peft_ext.int8_pack_weight.default, (q,))


def test_isa_names_are_checked():
    with pytest.raises(ValueError, match="must be 'scalar', 'avx2', 'avx_vnni' or 'avx512_vnni'"):
        ops.set_cpu_isa("bogus")
    from helpers import ALL_ISAS, ISAS
    for name in ALL_ISAS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="does not support"):
                ops.set_cpu_isa(name)
    assert ops.build_info()["cpu_isa_detected"] == ISAS[-1]


def _run_with_env(isa, code):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PEFT_EXT_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_selects_and_refuses_tiers():
    ok = _run_with_env("scalar", "from peft_ext import ops; print(ops.build_info()['cpu_isa'])")
    assert ok.returncode == 0 and ok.stdout.strip() == "scalar", ok.stderr
    bad = _run_with_env("bogus", "from peft_ext import ops; ops.build_info()")
    assert bad.returncode != 0 and "PEFT_EXT_CPU_ISA must be" in bad.stderr and "bogus" in bad.stderr
    info = _run_with_env("", "from peft_ext.__main__ import main; main(['info'])")
    assert f"CPU kernel ISA in use: {ops.build_info()['cpu_isa_detected']}" in info.stdout, info.stderr
