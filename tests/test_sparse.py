"""The sparse linear ops (2:4, CSR, BSR) against peft_ext.reference on fresh
random inputs of odd shapes, on every CPU kernel tier and on CUDA through one
`device` fixture (ids cpu-scalar, cpu-avx2, ..., cuda; what is missing here is
skipped, naming why); opcheck, autograd (and what it saves), and bad input.

Then what belongs to one device: the CPU's mixed-dtype inputs and argument
checks, and, in TestCudaOnly, the GPU paths: the 2:4 mma.sp kernel's large tile
and metadata, the BSR kernel's grid limits, torch.compile, SparseLinear and
patch() on CUDA, and host-side index checks that keep the context usable.
Shapes reach every CUDA path: the 2:4 kernel's small tile (M <= 64) and large
tile, K a multiple of 64 with aligned rows (no copy) and K off it or misaligned
views (zero-padded copies), N odd and off the 64/128 tile, M = 1; the BSR
kernel with several row tiles, short and wide blocks, and blocks too tall for
it (the dense fallback); float32 through the documented fallbacks.
"""
import pytest
import torch
from torch import nn

import peft_ext
from helpers import (close, cuda, gen, make_24, make_24_in, make_bsr, make_csr, mask_24, requires_cuda, run_on,
                     run_poisoned, sparse_tol as tol, to)
from peft_ext import formats, ops, reference as ref
from peft_ext.nn import SparseLinear
from peft_ext.ops import sparse as sparse_ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, K, N): the CPU tiers' shapes, then those that reach every CUDA path; all run on every device.
SHAPES = [(1, 4, 1), (1, 36, 5), (2, 20, 3), (3, 68, 13), (7, 132, 9), (8, 260, 33), (33, 100, 17), (130, 64, 7)]
SHAPES_24 = SHAPES + [(1, 64, 3), (2, 36, 5), (5, 128, 70), (17, 260, 33), (64, 192, 65), (65, 64, 130),
                      (130, 1000, 257), (300, 512, 384)]
BLOCKS = [(16, 16), (32, 32), (4, 8), (3, 5), (1, 1), (300, 4)]


# ---- every device

@pytest.mark.parametrize("shape", SHAPES_24)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse24_matches_reference(device, shape, dtype, bias):
    x, v, i, b = make_24_in(*shape, gen(), dtype)
    b = b if bias else None
    out = run_on(device, sparse_ops.sparse24_linear, x, v, i, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.device.type == device.type
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.cpu(), ref.sparse24_linear(x, v, i, b), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_3d_noncontiguous_and_misaligned(device, dtype):
    g = gen()
    _, v, i, b = make_24_in(1, 256, 45, g, dtype)
    v, i, b = to(device, v, i, b)
    wide = torch.randn(3, 7, 512, generator=g).to(dtype).to(device)
    # A contiguous view one element into its storage: rows are not 16-byte
    # aligned, which sends the op through its zero-padded copy.
    shifted = torch.randn(5 * 256 + 1, generator=g).to(dtype).to(device)[1:].view(5, 256)
    for x in [wide[..., ::2], wide[..., 1:257], wide[:, :, :256].transpose(0, 1), shifted]:
        out = run_on(device, sparse_ops.sparse24_linear, x, v, i, b)
        assert out.shape == (*x.shape[:-1], 45)
        expect = ref.sparse24_linear(x.cpu(), v.cpu(), i.cpu(), b.cpu())
        torch.testing.assert_close(out.cpu(), expect, **tol(dtype))


# --- issue 10 #13: a misaligned x alone is copied (not the weight) and the
# result is unchanged.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_misaligned_x_alone(device, dtype):
    g = gen()
    x, v, i, b = make_24_in(9, 256, 40, g, dtype)
    shifted = torch.randn(9 * 256 + 1, generator=g).to(dtype).to(device)[1:].view(9, 256)
    out = run_on(device, sparse_ops.sparse24_linear, shifted, v, i, b)
    torch.testing.assert_close(out.cpu(), ref.sparse24_linear(shifted.cpu(), v, i, b), **tol(dtype))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 3, 5, 8, 45, 70, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_matches_reference(device, block, m, dtype):
    rows, cols = (1, 3) if block[0] >= 300 else (5, 4)
    x, crow, col, v, k, b = make_bsr(m, block, rows, cols, gen(), density=0.4)
    x, v, b = x.to(dtype), v.to(dtype), b.to(dtype)
    out = run_on(device, sparse_ops.bsr_linear, x, crow, col, v, k, b)
    assert out.dtype == dtype and out.shape == (m, rows * block[0])
    torch.testing.assert_close(out.cpu(), ref.bsr_linear(x, crow, col, v, k, b), **tol(dtype))


def test_bsr_empty_rows_3d_and_noncontiguous(device):
    # Six block rows, all three stored blocks in row 2: the other rows give the bias.
    g = gen()
    k = 5 * 16
    crow = torch.tensor([0, 0, 0, 3, 3, 3, 3])
    col = torch.tensor([0, 2, 4], dtype=torch.int32)
    v, b = torch.randn(3, 16, 16, generator=g), torch.randn(96, generator=g)
    x3 = torch.randn(2, 3, 2 * k, generator=g)[..., ::2]
    out = run_on(device, sparse_ops.bsr_linear, x3, crow, col, v, k, b)
    torch.testing.assert_close(out.cpu(), ref.bsr_linear(x3, crow, col, v, k, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_in_every_dtype_matches_reference(device, dtype):
    g = gen()
    w = torch.randn(37, 90, generator=g)
    crow, col, v = formats.compress_csr(w, torch.rand(37, 90, generator=g) < 0.2)
    x, b = torch.randn(2, 11, 90, generator=g).to(dtype), torch.randn(37, generator=g)
    out = run_on(device, sparse_ops.csr_linear, x, crow, col, v.to(dtype), 90, b)
    torch.testing.assert_close(out.cpu(), ref.csr_linear(x, crow, col, v.to(dtype), 90, b), **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_csr_matches_reference(device, shape):
    args = make_csr(*shape, gen())
    close(sparse_ops.csr_linear(*to(device, *args)).cpu(), ref.csr_linear(*args))


def test_csr_empty_rows_and_full_rows(device):
    g = gen()
    w = torch.randn(6, 37, generator=g)
    mask = torch.zeros(6, 37, dtype=torch.bool)
    mask[1] = True
    mask[4, ::3] = True
    x = torch.randn(11, 37, generator=g)
    args = (x, *formats.compress_csr(w, mask), 37, None)
    close(sparse_ops.csr_linear(*to(device, *args)).cpu(), ref.csr_linear(*args))


def test_opcheck_in_every_dtype(device):
    g = gen()
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(torch.ops.peft_ext.sparse24_linear, to(device, *make_24_in(17, 132, 9, g, dtype)))
        x, crow, col, v, k, b = make_bsr(6, (16, 16), 3, 4, g)
        torch.library.opcheck(torch.ops.peft_ext.bsr_linear, to(device, x.to(dtype), crow, col, v.to(dtype), k, b))
    w = torch.randn(12, 40, generator=g)
    crow, col, v = formats.compress_csr(w, torch.rand(12, 40, generator=g) < 0.3)
    x = torch.randn(3, 40, generator=g)
    torch.library.opcheck(torch.ops.peft_ext.csr_linear, to(device, x, crow, col, v, 40, None))


def test_gradient_to_the_input_in_bfloat16(device):
    g = gen()
    x, v, i, b = to(device, *make_24_in(19, 192, 40, g, torch.bfloat16))
    x.requires_grad_(True)
    grad = torch.randn(19, 40, device=device, dtype=torch.bfloat16)
    sparse_ops.sparse24_linear(x, v, i, b).backward(grad)
    w = ref.decompress_24(v, i).double()
    torch.testing.assert_close(x.grad.double(), grad.double() @ w, atol=0.1, rtol=2e-2)
    xb, crow, col, vb, k, bb = to(device, *make_bsr(7, (16, 16), 3, 4, g))
    xb.requires_grad_(True)
    gb = torch.randn(7, 48, device=device)
    sparse_ops.bsr_linear(xb, crow, col, vb, k, bb).backward(gb)
    torch.testing.assert_close(xb.grad, gb @ ref.decompress_bsr(crow, col, vb, k), atol=1e-4, rtol=1e-4)


# --- issue 10 #4 / issue 9 #19: in_features == 0 gives the bias in every dtype, also through the
# tall-block fallback (300 x 4 blocks).
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_in_features_gives_bias_in_every_dtype(device, dtype):
    n = 6
    x = torch.randn(3, 0, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    col = torch.zeros(0, dtype=torch.int32, device=device)
    calls = [
        lambda bias: sparse_ops.sparse24_linear(x, torch.zeros(n, 0, device=device, dtype=dtype),
                                                torch.zeros(n, 0, dtype=torch.uint8, device=device), bias),
        lambda bias: sparse_ops.csr_linear(x, crow, col, torch.zeros(0, device=device, dtype=dtype), 0, bias),
        lambda bias: sparse_ops.bsr_linear(x, crow[: n // 2 + 1], col, torch.zeros(0, 2, 4, device=device, dtype=dtype),
                                           0, bias),
        lambda bias: sparse_ops.bsr_linear(x, crow[:2], col, torch.zeros(0, 300, 4, device=device, dtype=dtype),
                                           0, bias[:1].expand(300).contiguous() if bias is not None else None),
    ]
    for j, call in enumerate(calls):
        out = call(b)
        want = b.expand(3, n) if j < 3 else b[:1].expand(3, 300)
        assert torch.equal(out, want)
        assert (call(None) == 0).all()


# ---- the CPU alone: default tier or every tier (`isa`)

# Malformed compressed rows given straight to the ops (SparseLinear checks its
# parts on load; the ops check on every call, before any index is read).
# 3 rows of a 6-column weight; each case breaks one rule.
_ROWS_OK = ([0, 2, 2, 4], [1, 4, 0, 5])
_BAD_ROWS = [
    ([0, 2, 2, 4], [1, 6, 0, 5], r"col\[1\]=6 is outside \[0, 6\)"),  # last of a row too large
    ([0, 2, 2, 4], [-1, 4, 0, 5], r"col\[0\]=-1 is outside"),  # first of a row negative
    ([0, 3, 3, 4], [1, 9, 2, 5], r"col\[1\]=9 is outside"),  # too large in the middle of a row
    ([0, 2, 2, 4], [4, 1, 0, 5], "col must ascend within each row \\(row 0\\)"),
    ([0, 2, 2, 4], [1, 4, 3, 3], "col must ascend within each row \\(row 2\\)"),  # a duplicate
    ([0, 3, 2, 4], [1, 4, 0, 5], "crow must be non-decreasing \\(row 1\\)"),
    ([0, 2, 2, 3], [1, 4, 0, 5], "crow must start at 0 and end at 4"),
]


@pytest.mark.parametrize("crow,col,match", _BAD_ROWS)
def test_malformed_rows_are_refused_by_the_ops(isa, crow, col, match):
    x = torch.randn(2, 6)
    crow_t, col_t = torch.tensor(crow), torch.tensor(col, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        sparse_ops.csr_linear(x, crow_t, col_t, torch.randn(4), 6, None)
    # The same structure as 1x1 blocks.
    with pytest.raises(ValueError, match=match.replace("values", "blocks")):
        sparse_ops.bsr_linear(x, crow_t, col_t, torch.randn(4, 1, 1), 6, None)


def test_well_formed_rows_pass_the_check(isa):
    x = torch.randn(2, 6)
    crow, col = torch.tensor(_ROWS_OK[0]), torch.tensor(_ROWS_OK[1], dtype=torch.int32)
    v = torch.randn(4)
    w = torch.zeros(3, 6)
    w[0, 1], w[0, 4], w[2, 0], w[2, 5] = v
    torch.testing.assert_close(sparse_ops.csr_linear(x, crow, col, v, 6, None), x @ w.t())


def test_24_format_round_trips():
    g = gen()
    w = torch.randn(9, 44, generator=g) * mask_24(9, 44, g)
    values, indices = formats.compress_24(w, w != 0)
    assert values.shape == (9, 22) and indices.shape == (9, 6) and indices.dtype == torch.uint8
    torch.testing.assert_close(ref.decompress_24(values, indices), w, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_half_inputs_and_3d_noncontiguous(isa, dtype):
    g = gen()
    x, v, i, b = make_24(1, 68, 11, g)
    x3 = torch.randn(3, 68, 5, generator=g).transpose(1, 2).to(dtype)  # [3, 5, 68], not contiguous
    out = sparse_ops.sparse24_linear(x3, v, i, b)
    assert out.shape == (3, 5, 11) and out.dtype == dtype
    close(out, ref.sparse24_linear(x3, v, i, b), dtype)


def test_opcheck():
    g = gen()
    for m in (1, 9):
        torch.library.opcheck(torch.ops.peft_ext.sparse24_linear, make_24(m, 36, 5, g))
        torch.library.opcheck(torch.ops.peft_ext.csr_linear, make_csr(m, 30, 6, g))
        torch.library.opcheck(torch.ops.peft_ext.bsr_linear, make_bsr(m, (4, 8), 2, 3, g))


def test_gradients_match_dense():
    g = gen()
    x, v, i, b = make_24(5, 36, 7, g)
    x.requires_grad_(True)
    v.requires_grad_(True)
    b.requires_grad_(True)
    sparse_ops.sparse24_linear(x, v, i, b).square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    w = ref.decompress_24(v.detach(), i).requires_grad_(True)
    bd = b.detach().clone().requires_grad_(True)
    (xd @ w.t() + bd).square().sum().backward()
    close(x.grad, xd.grad)
    close(b.grad, bd.grad)
    close(v.grad, w.grad.gather(1, ref.columns_24(i, v.shape[1])))
    for make, fn, rf in ((make_csr, sparse_ops.csr_linear, ref.decompress_csr),
                         (make_bsr, sparse_ops.bsr_linear, ref.decompress_bsr)):
        args = list(make(4, (2, 4), 2, 3, g) if make is make_bsr else make(4, 12, 6, g))
        args[0].requires_grad_(True)
        args[3].requires_grad_(True)
        fn(*args).sum().backward()
        w = rf(args[1], args[2], args[3].detach(), args[4])
        close(args[0].grad, torch.ones(4, w.shape[0]) @ w)
        assert args[3].grad.shape == args[3].shape


def test_bad_input_names_the_argument():
    g = gen()
    x, v, i, b = make_24(2, 36, 5, g)
    with pytest.raises(ValueError, match="in_features=36"):
        sparse_ops.sparse24_linear(torch.randn(2, 40), v, i, b)
    with pytest.raises(TypeError, match="x must be float"):
        sparse_ops.sparse24_linear(x.int(), v, i, b)
    with pytest.raises(TypeError, match="indices must be uint8"):
        sparse_ops.sparse24_linear(x, v, i.to(torch.int8), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_ops.sparse24_linear(x, v, i, torch.randn(4))
    x, crow, col, vals, k, b = make_csr(2, 30, 6, g)
    bad = col.clone()
    bad[0] = 30
    with pytest.raises(ValueError, match="col"):
        sparse_ops.csr_linear(x, crow, bad, vals, k, b)
    with pytest.raises(TypeError, match="col must be Int"):
        sparse_ops.csr_linear(x, crow, col.long(), vals, k, b)
    with pytest.raises(ValueError, match="crow"):
        sparse_ops.csr_linear(x, crow.flip(0), col, vals, k, b)
    x, crow, col, vals, k, b = make_bsr(2, (4, 8), 2, 3, g)
    with pytest.raises(ValueError, match="block width"):
        sparse_ops.bsr_linear(torch.randn(2, 20), crow, col, vals, 20, b)


# --- issue 9 #19: in_features == 0 gives the bias (as the int8 ops do), for
# every sparse op, with and without leading dimensions.
@pytest.mark.parametrize("lead", [(3,), (2, 4), ()])
def test_empty_in_features_gives_bias(lead):
    n, b = 6, torch.randn(6)
    x = torch.randn(*lead, 0)
    want = b.expand(*lead, n)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    col = torch.zeros(0, dtype=torch.int32)
    calls = [
        lambda bias: sparse_ops.sparse24_linear(x, torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.uint8), bias),
        lambda bias: sparse_ops.csr_linear(x, crow, col, torch.zeros(0), 0, bias),
        lambda bias: sparse_ops.bsr_linear(x, torch.zeros(n // 2 + 1, dtype=torch.int64), col,
                                           torch.zeros(0, 2, 4), 0, bias),
    ]
    for call in calls:
        torch.testing.assert_close(call(b), want, rtol=0, atol=0)
        out = call(None)
        assert out.shape == want.shape and (out == 0).all()


# --- issue 9 #22: a meta-device input with CPU weights raises (device
# mismatch) instead of returning a meta tensor; every op of the library goes
# through the same C++ check (csrc/ops.cpp), so the int8 ops are checked here too.
def test_meta_input_with_cpu_weights_raises_for_every_op():
    g = gen()
    x, v, i, b = make_24(2, 36, 5, g)
    meta = torch.empty_like(x, device="meta")
    with pytest.raises(ValueError, match="values is on cpu but x is on meta"):
        sparse_ops.sparse24_linear(meta, v, i, b)
    x, crow, col, vals, k, b = make_csr(2, 30, 6, g)
    with pytest.raises(ValueError, match="crow is on cpu but x is on meta"):
        sparse_ops.csr_linear(torch.empty_like(x, device="meta"), crow, col, vals, k, b)
    x, crow, col, vals, k, b = make_bsr(2, (4, 8), 2, 3, g)
    with pytest.raises(ValueError, match="is on cpu but x is on meta"):
        sparse_ops.bsr_linear(torch.empty_like(x, device="meta"), crow, col, vals, k, b)
    q, s = ops.quantize_weight(torch.randn(4, 8))
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
            fn(torch.empty(3, 8, device="meta"), q, s, None)
    with pytest.raises(ValueError, match="weight_scale is on meta but weight is on cpu"):
        ops.int8_dequantize(q, s.to("meta"))
    # All on meta: the fake kernels still give shapes (tracing needs them).
    assert sparse_ops.csr_linear(torch.empty(3, 30, device="meta"), crow.new_zeros(7).to("meta"),
                                 col[:0].to("meta"), vals[:0].to("meta"), 30, None).shape == (3, 6)
    assert ops.int8_linear(torch.empty(3, 8, device="meta"), q.to("meta"), s.to("meta"), None).shape == (3, 4)


# ---- autograd keeps the activation x only when the stored values learn: fine-tuning
# through frozen sparse layers keeps no activations.

SAVED_CASES = {
    "2:4": (lambda g: make_24(6, 36, 5, g), sparse_ops.sparse24_linear, 1),
    "csr": (lambda g: make_csr(6, 30, 7, g), sparse_ops.csr_linear, 3),
    "bsr": (lambda g: make_bsr(6, (4, 8), 2, 3, g), sparse_ops.bsr_linear, 3),
}


def saved_during(fn, *args):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def holds(saved, t):
    return any(s.data_ptr() == t.data_ptr() and s.shape == t.shape for s in saved)


@pytest.mark.parametrize("kind", sorted(SAVED_CASES))
def test_frozen_values_save_no_activation(kind):
    make, fn, values_at = SAVED_CASES[kind]
    args = list(make(torch.Generator().manual_seed(7)))
    x = args[0].requires_grad_(True)
    args[-1].requires_grad_(True)  # the bias learns; the values stay frozen
    out, saved = saved_during(fn, *args)
    assert not holds(saved, x)
    grad = torch.randn_like(out)
    out.backward(grad)  # the backward still works without x
    assert x.grad is not None and args[-1].grad is not None


@pytest.mark.parametrize("kind", sorted(SAVED_CASES))
def test_trainable_values_save_the_activation(kind):
    make, fn, values_at = SAVED_CASES[kind]
    args = list(make(torch.Generator().manual_seed(8)))
    x = args[0].requires_grad_(True)
    args[values_at].requires_grad_(True)
    out, saved = saved_during(fn, *args)
    assert holds(saved, x)
    out.sum().backward()
    assert args[values_at].grad is not None and args[values_at].grad.shape == args[values_at].shape


# ---- CUDA alone: GPU paths and GPU-only behaviour

@pytest.mark.cuda
@requires_cuda
class TestCudaOnly:
    def test_sparse24_large_tile_many_blocks(self):
        # Enough row and feature tiles that blocks run concurrently on every SM.
        x, v, i, b = make_24_in(1100, 640, 1030, gen(), torch.bfloat16)
        out = run_poisoned(sparse_ops.sparse24_linear, *cuda(x, v, i, b))
        torch.testing.assert_close(out.cpu(), ref.sparse24_linear(x, v, i, b), **tol(torch.bfloat16))

    def test_sparse24_unloaded_module_gives_the_bias(self):
        # A fresh module stores zero positions (invalid hardware metadata): the
        # kernel rewrites them, and zero values give exactly the bias.
        layer = SparseLinear(128, 24, pattern="2:4", device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            layer.bias.copy_(torch.randn(24))
        out = layer(torch.randn(9, 128, device="cuda", dtype=torch.bfloat16))
        assert torch.equal(out, layer.bias.expand_as(out))

    def test_torch_compile_fullgraph_on_cuda(self):
        g = gen()
        x, v, i, b = cuda(*make_24_in(33, 256, 70, g, torch.bfloat16))
        xb, crow, col, vb, k, bb = cuda(*make_bsr(33, (16, 16), 4, 16, g))

        @torch.compile(fullgraph=True)
        def f(x, xb):
            return (sparse_ops.sparse24_linear(x, v, i, b).float().relu(),
                    sparse_ops.bsr_linear(xb, crow, col, vb, k, bb))

        y24, ybsr = f(x, xb)
        torch.testing.assert_close(y24, sparse_ops.sparse24_linear(x, v, i, b).float().relu(), atol=0, rtol=0)
        torch.testing.assert_close(ybsr, sparse_ops.bsr_linear(xb, crow, col, vb, k, bb), atol=0, rtol=0)

    @pytest.mark.parametrize("pattern, kw", [("2:4", {}), ("block", {"block": (16, 16)})])
    def test_sparse_linear_end_to_end_on_cuda(self, pattern, kw):
        lin = nn.Linear(256, 96).cuda().to(torch.bfloat16)
        sparsity = 0.5 if pattern == "2:4" else 0.9
        peft_ext.prune(nn.Sequential(lin), sparsity, pattern, exclude_modules=None, masked_training=False, **kw)
        sp = SparseLinear.from_linear(lin, pattern=pattern, **kw)
        assert sp.values.is_cuda and sp.values.dtype == torch.bfloat16
        x = torch.randn(4, 37, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = sp(x)
        expect = (x.detach().double() @ lin.weight.double().t() + lin.bias.double())
        torch.testing.assert_close(out.double(), expect, atol=5e-2, rtol=2e-2)
        out.float().square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()

    def test_patch_on_cuda_uses_the_cuda_kernels(self):
        model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).cuda().to(torch.bfloat16)
        x = torch.randn(70, 128, device="cuda", dtype=torch.bfloat16)
        report = peft_ext.patch(model, sparsity=0.5, pattern="2:4", exclude_modules=None)
        assert all(r.new_type == "SparseLinear[2:4]" for r in report.replaced)
        assert all("mma.sp" in r.kernel for r in report.replaced)
        assert torch.isfinite(model(x).float()).all()

    # --- issue 10 #5: the CSR and tall-block fallbacks validate crow / col on the
    # host (ValueError, as on the CPU) instead of tripping a device-side assert
    # that would leave the CUDA context unusable.
    def test_fallbacks_refuse_malformed_indices_and_the_context_survives(self):
        g = gen()
        w = torch.randn(8, 30, generator=g)
        crow, col, v = formats.compress_csr(w, torch.rand(8, 30, generator=g) < 0.4)
        x = torch.randn(2, 30, generator=g)
        bad_col = col.clone()
        bad_col[0] = 30
        with pytest.raises(ValueError, match="col"):
            sparse_ops.csr_linear(*cuda(x, crow, bad_col, v), 30, None)
        bad_crow = crow.clone()
        bad_crow[-1] += 5
        with pytest.raises(ValueError, match="crow"):
            sparse_ops.csr_linear(*cuda(x, bad_crow, col, v), 30, None)
        xb, crow_b, col_b, vb, k, bb = make_bsr(2, (300, 4), 1, 3, g, density=1.0)
        bad = col_b.clone()
        bad[0] = 7
        with pytest.raises(ValueError, match="col"):
            sparse_ops.bsr_linear(*cuda(xb, crow_b, bad, vb), k, None)
        torch.cuda.synchronize()  # the context is still usable
        out = sparse_ops.csr_linear(*cuda(x, crow, col, v), 30, None)
        torch.testing.assert_close(out.cpu(), ref.csr_linear(x, crow, col, v, 30, None), atol=1e-4, rtol=1e-4)

    # --- issue 10 #7: more row tiles than grid.y holds (65535): the BSR kernel
    # strides over them. Blocks of 256 rows give tiles of 4 activation rows.
    def test_bsr_more_row_tiles_than_grid_y(self):
        g = gen()
        m = 4 * 65535 + 37
        xs, crow, col, v, k, b = make_bsr(2, (256, 8), 1, 2, g, density=1.0)
        x = torch.randn(m, k, generator=g)
        out = sparse_ops.bsr_linear(*cuda(x, crow, col, v), k, b.cuda())
        torch.testing.assert_close(out.cpu(), ref.bsr_linear(x, crow, col, v, k, b), atol=1e-4, rtol=1e-4)
