"""The int8 backward op (grad_x = grad @ dequant(W) from the int8 weight) against
peft_ext.reference on fresh random inputs of odd shapes, its registration
(opcheck), and the promise that a backward never allocates a float copy of a
frozen weight."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_int8 as make, requires_cuda, tol
from peft_ext import Int8Linear, reference as ref
from peft_ext.ops import int8 as ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K): rows of the gradient, out_features, in_features. K off multiples
# of 16 and 64 reaches the AVX2 kernel's column tail and the last partial block;
# M above 64 (the CPU's direct-kernel limit) the tiled BLAS path, with one
# block of weight rows (N = 1) or two (130 x 9, 300 x 70).
SHAPES = [(1, 1, 1), (1, 5, 37), (2, 3, 31), (3, 13, 33), (7, 17, 100), (13, 65, 257), (130, 9, 64),
          (6, 40, 130), (12, 31, 1000), (64, 21, 50), (65, 3, 16), (200, 1, 7), (300, 70, 33)]


def make_grad(m, n, k, dtype, seed=None):
    _, q, s, _ = make(1, k, n, seed=seed)
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(m, n, generator=g).to(dtype), q, s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_matches_reference(isa, shape, dtype):
    grad, q, s = make_grad(*shape, dtype)
    out = ops.int8_grad_input(grad, q, s)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2])
    torch.testing.assert_close(out, ref.int8_grad_input(grad, q, s), **tol(dtype))


def test_scalar_and_avx2_agree_and_keep_leading_dims(isa):
    grad, q, s = make_grad(2 * 3 * 5, 19, 75, torch.float32)
    out = ops.int8_grad_input(grad.reshape(2, 3, 5, 19), q, s)
    assert out.shape == (2, 3, 5, 75)
    torch.testing.assert_close(out.reshape(30, 75), ref.int8_grad_input(grad, q, s), **tol(torch.float32))


def test_empty_and_zero_rows():
    _, q, s = make_grad(1, 4, 9, torch.float32)
    assert ops.int8_grad_input(torch.randn(0, 4), q, s).shape == (0, 9)
    q[1] = 0
    s[1] = 0  # an all-zero weight row has scale 0: no NaN
    grad = torch.randn(3, 4)
    out = ops.int8_grad_input(grad, q, s)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.int8_grad_input(grad, q, s), **tol(torch.float32))


def test_nan_in_nan_out():
    grad, q, s = make_grad(3, 8, 20, torch.float32)
    grad[1, 2] = float("nan")
    out = ops.int8_grad_input(grad, q, s)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_bad_arguments_name_the_argument():
    grad, q, s = make_grad(3, 8, 20, torch.float32)
    with pytest.raises(TypeError, match="grad"):
        ops.int8_grad_input(grad.int(), q, s)
    with pytest.raises(TypeError, match="weight must be int8"):
        ops.int8_grad_input(grad, q.float(), s)
    with pytest.raises(ValueError, match="out_features"):
        ops.int8_grad_input(torch.randn(3, 7), q, s)
    with pytest.raises(ValueError, match="weight_scale"):
        ops.int8_grad_input(grad, q, s[:-1])


def test_opcheck_grad_input():
    grad, q, s = make_grad(5, 11, 33, torch.float32)
    torch.library.opcheck(torch.ops.peft_ext.int8_grad_input.default, (grad, q, s))
    torch.library.opcheck(torch.ops.peft_ext.int8_grad_input.default, (grad.reshape(5, 1, 11).bfloat16(), q, s))


class RecordAllocations(TorchDispatchMode):
    """The shape and dtype of every tensor an op returns (each one is an allocation or a view)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((func, tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_backward_allocates_no_float_copy_of_the_weight(mode):
    # K != N and M far from both, so a float [N, K] (or [K, N]) tensor can only be a weight copy.
    layer = Int8Linear.from_linear(torch.nn.Linear(48, 80), mode=mode)
    x = torch.randn(3, 7, 48, requires_grad=True)
    y = layer(x)
    with RecordAllocations() as rec:
        y.backward(torch.randn_like(y))
    weight_shapes = {(80, 48), (48, 80)}
    copies = [(str(f), s, d) for f, s, d in rec.outputs if s in weight_shapes and d.is_floating_point]
    assert not copies, copies
    assert any("int8_grad_input" in str(f) for f, _, _ in rec.outputs)


def test_backward_matches_dequantized_linear():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(37, 23), mode="weight_only")
    x = torch.randn(5, 37, requires_grad=True)
    g = torch.randn(5, 23)
    layer(x).backward(g)
    w = layer.dequantized_weight().double()
    torch.testing.assert_close(x.grad, (g.double() @ w).float(), **tol(torch.float32))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", SHAPES + [(300, 257, 96), (1500, 160, 2100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_cuda_matches_reference(shape, dtype):
    grad, q, s = make_grad(*shape, dtype)
    out = ops.int8_grad_input(grad.cuda(), q.cuda(), s.cuda())
    assert out.dtype == dtype and out.shape == (shape[0], shape[2]) and out.is_cuda
    torch.testing.assert_close(out.cpu(), ref.int8_grad_input(grad, q, s), **tol(dtype))
