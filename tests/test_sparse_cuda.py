"""The CUDA sparse linear ops (2:4 mma.sp kernel, BSR block kernel, CSR
fallback) against peft_ext.reference (float64 on the CPU) on fresh random
inputs of odd shapes; opcheck, torch.compile, gradients and SparseLinear on
CUDA. Skipped without a GPU.

Shapes reach every path: the 2:4 kernel's small tile (M <= 64) and large tile,
K a multiple of 64 with aligned rows (no copy) and K off it or misaligned
views (zero-padded copies), N odd and off the 64/128 tile, M = 1; the BSR
kernel with several row tiles, short and wide blocks, and blocks too tall for
it (the dense fallback); float32 through the documented fallbacks.
"""
import pytest
import torch
from torch import nn

import peft_ext
from helpers import make_bsr, mask_24, requires_cuda, run_poisoned
from peft_ext import formats, reference as ref
from peft_ext.ops import sparse as sparse_ops
from peft_ext.nn import SparseLinear

pytestmark = [pytest.mark.cuda, requires_cuda]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, K, N)
SHAPES_24 = [(1, 4, 1), (1, 64, 3), (2, 36, 5), (5, 128, 70), (17, 260, 33), (64, 192, 65), (65, 64, 130),
             (130, 1000, 257), (300, 512, 384)]
BLOCKS = [(16, 16), (32, 32), (4, 8), (3, 5), (1, 1), (300, 4)]


def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def tol(dtype):
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=2e-3)}[dtype]


def make_24(m, k, n, g, dtype):
    """CPU inputs in `dtype`: x [m, k], values, indices, bias."""
    w = torch.randn(n, k, generator=g).to(dtype)
    values, indices = formats.compress_24(w, mask_24(n, k, g))
    return torch.randn(m, k, generator=g).to(dtype), values, indices, torch.randn(n, generator=g).to(dtype)


def cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("shape", SHAPES_24)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse24_matches_reference(shape, dtype, bias):
    x, v, i, b = make_24(*shape, gen(), dtype)
    b = b if bias else None
    out = run_poisoned(sparse_ops.sparse24_linear, *cuda(x, v, i, b))
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.is_cuda
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.cpu(), ref.sparse24_linear(x, v, i, b), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_3d_noncontiguous_and_misaligned(dtype):
    g = gen()
    _, v, i, b = make_24(1, 256, 45, g, dtype)
    v, i, b = cuda(v, i, b)
    wide = torch.randn(3, 7, 512, generator=g).to(dtype).cuda()
    # A contiguous view one element into its storage: rows are not 16-byte
    # aligned, which sends the op through its zero-padded copy.
    shifted = torch.randn(5 * 256 + 1, generator=g).to(dtype).cuda()[1:].view(5, 256)
    for x in [wide[..., ::2], wide[..., 1:257], wide[:, :, :256].transpose(0, 1), shifted]:
        out = run_poisoned(sparse_ops.sparse24_linear, x, v, i, b)
        assert out.shape == (*x.shape[:-1], 45)
        expect = ref.sparse24_linear(x.cpu(), v.cpu(), i.cpu(), b.cpu())
        torch.testing.assert_close(out.cpu(), expect, **tol(dtype))


def test_sparse24_large_tile_many_blocks():
    # Enough row and feature tiles that blocks run concurrently on every SM.
    x, v, i, b = make_24(1100, 640, 1030, gen(), torch.bfloat16)
    out = run_poisoned(sparse_ops.sparse24_linear, *cuda(x, v, i, b))
    torch.testing.assert_close(out.cpu(), ref.sparse24_linear(x, v, i, b), **tol(torch.bfloat16))


def test_sparse24_unloaded_module_gives_the_bias():
    # A fresh module stores zero positions (invalid hardware metadata): the
    # kernel rewrites them, and zero values give exactly the bias.
    layer = SparseLinear(128, 24, pattern="2:4", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(24))
    out = layer(torch.randn(9, 128, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(out, layer.bias.expand_as(out))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 5, 70, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_matches_reference(block, m, dtype):
    rows, cols = (1, 3) if block[0] >= 300 else (5, 4)
    x, crow, col, v, k, b = make_bsr(m, block, rows, cols, gen(), density=0.4)
    x, v, b = x.to(dtype), v.to(dtype), b.to(dtype)
    out = run_poisoned(sparse_ops.bsr_linear, *cuda(x, crow, col, v, k, b))
    assert out.dtype == dtype and out.shape == (m, rows * block[0])
    torch.testing.assert_close(out.cpu(), ref.bsr_linear(x, crow, col, v, k, b), **tol(dtype))


def test_bsr_empty_rows_3d_and_noncontiguous():
    # Six block rows, all three stored blocks in row 2: the other rows give the bias.
    g = gen()
    k = 5 * 16
    crow = torch.tensor([0, 0, 0, 3, 3, 3, 3])
    col = torch.tensor([0, 2, 4], dtype=torch.int32)
    v, b = torch.randn(3, 16, 16, generator=g), torch.randn(96, generator=g)
    x3 = torch.randn(2, 3, 2 * k, generator=g)[..., ::2]
    out = run_poisoned(sparse_ops.bsr_linear, *cuda(x3, crow, col, v, k, b))
    torch.testing.assert_close(out.cpu(), ref.bsr_linear(x3, crow, col, v, k, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_fallback_matches_reference(dtype):
    g = gen()
    w = torch.randn(37, 90, generator=g)
    crow, col, v = formats.compress_csr(w, torch.rand(37, 90, generator=g) < 0.2)
    x, b = torch.randn(2, 11, 90, generator=g).to(dtype), torch.randn(37, generator=g)
    out = run_poisoned(sparse_ops.csr_linear, *cuda(x, crow, col, v.to(dtype), 90, b))
    torch.testing.assert_close(out.cpu(), ref.csr_linear(x, crow, col, v.to(dtype), 90, b), **tol(dtype))


def test_opcheck_on_cuda():
    g = gen()
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(torch.ops.peft_ext.sparse24_linear, cuda(*make_24(17, 132, 9, g, dtype)))
        x, crow, col, v, k, b = make_bsr(6, (16, 16), 3, 4, g)
        torch.library.opcheck(torch.ops.peft_ext.bsr_linear, cuda(x.to(dtype), crow, col, v.to(dtype), k, b))
    w = torch.randn(12, 40, generator=g)
    crow, col, v = formats.compress_csr(w, torch.rand(12, 40, generator=g) < 0.3)
    torch.library.opcheck(torch.ops.peft_ext.csr_linear, cuda(torch.randn(3, 40, generator=g), crow, col, v, 40, None))


def test_torch_compile_fullgraph_on_cuda():
    g = gen()
    x, v, i, b = cuda(*make_24(33, 256, 70, g, torch.bfloat16))
    xb, crow, col, vb, k, bb = cuda(*make_bsr(33, (16, 16), 4, 16, g))

    @torch.compile(fullgraph=True)
    def f(x, xb):
        return sparse_ops.sparse24_linear(x, v, i, b).float().relu(), sparse_ops.bsr_linear(xb, crow, col, vb, k, bb)

    y24, ybsr = f(x, xb)
    torch.testing.assert_close(y24, sparse_ops.sparse24_linear(x, v, i, b).float().relu(), atol=0, rtol=0)
    torch.testing.assert_close(ybsr, sparse_ops.bsr_linear(xb, crow, col, vb, k, bb), atol=0, rtol=0)


def test_gradient_to_the_input_on_cuda():
    g = gen()
    x, v, i, b = cuda(*make_24(19, 192, 40, g, torch.bfloat16))
    x.requires_grad_(True)
    grad = torch.randn(19, 40, device="cuda", dtype=torch.bfloat16)
    sparse_ops.sparse24_linear(x, v, i, b).backward(grad)
    w = ref.decompress_24(v, i).double()
    torch.testing.assert_close(x.grad.double(), grad.double() @ w, atol=0.1, rtol=2e-2)
    xb, crow, col, vb, k, bb = cuda(*make_bsr(7, (16, 16), 3, 4, g))
    xb.requires_grad_(True)
    gb = torch.randn(7, 48, device="cuda")
    sparse_ops.bsr_linear(xb, crow, col, vb, k, bb).backward(gb)
    torch.testing.assert_close(xb.grad, gb @ ref.decompress_bsr(crow, col, vb, k), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern, kw", [("2:4", {}), ("block", {"block": (16, 16)})])
def test_sparse_linear_end_to_end_on_cuda(pattern, kw):
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


def test_patch_on_cuda_uses_the_cuda_kernels():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).cuda().to(torch.bfloat16)
    x = torch.randn(70, 128, device="cuda", dtype=torch.bfloat16)
    report = peft_ext.patch(model, sparsity=0.5, pattern="2:4", exclude_modules=None)
    assert all(r.new_type == "SparseLinear[2:4]" for r in report.replaced)
    assert all("mma.sp" in r.kernel for r in report.replaced)
    assert torch.isfinite(model(x).float()).all()


# --- issue 10 #4 / issue 9 #19: in_features == 0 gives the bias on CUDA.
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_in_features_gives_bias_on_cuda(dtype):
    n = 6
    x = torch.randn(3, 0, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    crow = torch.zeros(n + 1, dtype=torch.int64, device="cuda")
    col = torch.zeros(0, dtype=torch.int32, device="cuda")
    calls = [
        lambda bias: sparse_ops.sparse24_linear(x, torch.zeros(n, 0, device="cuda", dtype=dtype),
                                                torch.zeros(n, 0, dtype=torch.uint8, device="cuda"), bias),
        lambda bias: sparse_ops.csr_linear(x, crow, col, torch.zeros(0, device="cuda", dtype=dtype), 0, bias),
        lambda bias: sparse_ops.bsr_linear(x, crow[: n // 2 + 1], col, torch.zeros(0, 2, 4, device="cuda", dtype=dtype),
                                           0, bias),
        lambda bias: sparse_ops.bsr_linear(x, crow[:2], col, torch.zeros(0, 300, 4, device="cuda", dtype=dtype),
                                           0, bias[:1].expand(300).contiguous() if bias is not None else None),
    ]
    for j, call in enumerate(calls):
        out = call(b)
        want = b.expand(3, n) if j < 3 else b[:1].expand(3, 300)
        assert torch.equal(out, want)
        assert (call(None) == 0).all()


# --- issue 10 #5: the CSR and tall-block fallbacks validate crow / col on the
# host (ValueError, as on the CPU) instead of tripping a device-side assert
# that would leave the CUDA context unusable.
def test_fallbacks_refuse_malformed_indices_and_the_context_survives():
    g = gen()
    w = torch.randn(8, 30, generator=g)
    crow, col, v = ref.compress_csr(w, torch.rand(8, 30, generator=g) < 0.4)
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
def test_bsr_more_row_tiles_than_grid_y():
    g = gen()
    m = 4 * 65535 + 37
    xs, crow, col, v, k, b = make_bsr(2, (256, 8), 1, 2, g, density=1.0)
    x = torch.randn(m, k, generator=g)
    out = sparse_ops.bsr_linear(*cuda(x, crow, col, v), k, b.cuda())
    torch.testing.assert_close(out.cpu(), ref.bsr_linear(x, crow, col, v, k, b), atol=1e-4, rtol=1e-4)


# --- issue 10 #13: a misaligned x alone is copied (not the weight) and the
# result is unchanged.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_misaligned_x_alone(dtype):
    g = gen()
    x, v, i, b = make_24(9, 256, 40, g, dtype)
    shifted = torch.randn(9 * 256 + 1, generator=g).to(dtype).cuda()[1:].view(9, 256)
    out = run_poisoned(sparse_ops.sparse24_linear, shifted, *cuda(v, i, b))
    torch.testing.assert_close(out.cpu(), ref.sparse24_linear(shifted.cpu(), v, i, b), **tol(dtype))
