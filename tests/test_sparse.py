"""The sparse linear ops (2:4, CSR, BSR) against peft_ext.reference on fresh
random inputs of odd shapes, opcheck, autograd, and bad input."""
import pytest
import torch

from peft_ext import formats, reference as ref
from peft_ext.ops import sparse as sparse_ops

SHAPES = [(1, 4, 1), (1, 36, 5), (2, 20, 3), (3, 68, 13), (7, 132, 9), (8, 260, 33), (33, 100, 17), (130, 64, 7)]
BLOCKS = [(16, 16), (32, 32), (4, 8), (3, 5), (1, 1)]


def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def mask_24(n, k, g):
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(dim=2)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)


def make_24(m, k, n, g, dtype=torch.float32):
    w = torch.randn(n, k, generator=g)
    values, indices = formats.compress_24(w, mask_24(n, k, g))
    return torch.randn(m, k, generator=g).to(dtype), values, indices, torch.randn(n, generator=g)


def make_csr(m, k, n, g, density=0.3):
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < density
    return (torch.randn(m, k, generator=g), *formats.compress_csr(w, mask), k, torch.randn(n, generator=g))


def make_bsr(m, block, rows, cols, g, density=0.4):
    bh, bw = block
    n, k = rows * bh, cols * bw
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(rows, cols, generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (torch.randn(m, k, generator=g), *formats.compress_bsr(w, mask, block), k, torch.randn(n, generator=g))


def close(out, expected, dtype=torch.float32):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected, **tol)


def test_24_format_round_trips():
    g = gen()
    w = torch.randn(9, 44, generator=g) * mask_24(9, 44, g)
    values, indices = formats.compress_24(w, w != 0)
    assert values.shape == (9, 22) and indices.shape == (9, 6) and indices.dtype == torch.uint8
    torch.testing.assert_close(ref.decompress_24(values, indices), w, atol=0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse24_matches_reference(isa, shape, bias):
    x, v, i, b = make_24(*shape, gen())
    b = b if bias else None
    out = sparse_ops.sparse24_linear(x, v, i, b)
    assert out.shape == (shape[0], shape[2])
    close(out, ref.sparse24_linear(x, v, i, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_half_inputs_and_3d_noncontiguous(isa, dtype):
    g = gen()
    x, v, i, b = make_24(1, 68, 11, g)
    x3 = torch.randn(3, 68, 5, generator=g).transpose(1, 2).to(dtype)  # [3, 5, 68], not contiguous
    out = sparse_ops.sparse24_linear(x3, v, i, b)
    assert out.shape == (3, 5, 11) and out.dtype == dtype
    close(out, ref.sparse24_linear(x3, v, i, b), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_csr_matches_reference(isa, shape):
    args = make_csr(*shape, gen())
    close(sparse_ops.csr_linear(*args), ref.csr_linear(*args))


def test_csr_empty_rows_and_full_rows(isa):
    g = gen()
    w = torch.randn(6, 37, generator=g)
    mask = torch.zeros(6, 37, dtype=torch.bool)
    mask[1] = True
    mask[4, ::3] = True
    x = torch.randn(11, 37, generator=g)
    args = (x, *formats.compress_csr(w, mask), 37, None)
    close(sparse_ops.csr_linear(*args), ref.csr_linear(*args))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 3, 8, 45])
def test_bsr_matches_reference(isa, block, m):
    args = make_bsr(m, block, 3, 5, gen())
    close(sparse_ops.bsr_linear(*args), ref.bsr_linear(*args))


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
    from peft_ext import ops

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
