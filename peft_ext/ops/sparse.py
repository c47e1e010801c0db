"""The sparse linear ops: thin wrappers, their fake kernels (for tracing)
and autograd. The backward is dense: the gradient wrt x multiplies by the
densified weight (a 2:4 weight's transpose is not 2:4), and the gradient wrt
the stored values is the dense weight gradient read at the stored positions,
so x is saved only when the values need a gradient (frozen sparse layers keep
no activations)."""
import torch

from .. import _C  # noqa: F401  (loads the library and registers the ops)
from .. import formats

_ops = torch.ops.peft_ext


def sparse24_linear(x, values, indices, bias=None):
    """y = x @ W^T + bias, W 2:4 sparse as kept values + packed 2-bit positions."""
    return _ops.sparse24_linear(x, values, indices, bias)


def csr_linear(x, crow, col, values, in_features, bias=None):
    return _ops.csr_linear(x, crow, col, values, in_features, bias)


def bsr_linear(x, crow, col, values, in_features, bias=None):
    return _ops.bsr_linear(x, crow, col, values, in_features, bias)


def _out(x, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("peft_ext::sparse24_linear")
def _sparse24_fake(x, values, indices, bias):
    torch._check(x.shape[-1] == 2 * values.shape[1], lambda: "x and values disagree on in_features")
    return _out(x, values.shape[0])


@torch.library.register_fake("peft_ext::csr_linear")
def _csr_fake(x, crow, col, values, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "x and the weight disagree on in_features")
    return _out(x, crow.shape[0] - 1)


@torch.library.register_fake("peft_ext::bsr_linear")
def _bsr_fake(x, crow, col, values, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "x and the weight disagree on in_features")
    return _out(x, (crow.shape[0] - 1) * values.shape[1])


def _dense_grad_w(x, grad):
    return grad.reshape(-1, grad.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()


def _finish(ctx, grad, x, w, values_grad):
    grad_x = grad @ w.to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, values_grad, grad_b


def _setup(values_at):
    """setup_context for an op whose stored values are input `values_at`."""
    def setup(ctx, inputs, output):
        bias = inputs[-1]
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        tensors = [t if isinstance(t, torch.Tensor) else None for t in inputs[:-1]]
        if not ctx.needs_input_grad[values_at]:
            tensors[0] = None  # only the values' gradient reads x
        ctx.save_for_backward(*tensors)
        ctx.extra = [t for t in inputs[:-1] if not isinstance(t, torch.Tensor)]
    return setup


def _sparse24_backward(ctx, grad):
    x, values, indices = ctx.saved_tensors
    w = formats.decompress_24(values, indices)
    gv = None
    if ctx.needs_input_grad[1]:
        cols = formats.columns_24(indices, values.shape[1])
        gv = _dense_grad_w(x, grad).gather(1, cols).to(values.dtype)
    gx, gv, gb = _finish(ctx, grad, x, w, gv)
    return gx, gv, None, gb


def _block_rows(crow):
    """The block row (CSR: the row) of every stored entry."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def _csr_values_grad(gw, crow, col, values, in_features):
    return gw[_block_rows(crow), col.long()]


def _bsr_values_grad(gw, crow, col, values, in_features):
    nnzb, bh, bw = values.shape
    blocks = gw.reshape(crow.numel() - 1, bh, in_features // bw, bw).permute(0, 2, 1, 3)
    return blocks[_block_rows(crow), col.long()]


def _compressed_backward(decompress, values_grad):
    """backward of an op (x, crow, col, values, in_features, bias)."""
    def backward(ctx, grad):
        x, crow, col, values, _ = ctx.saved_tensors
        (in_features,) = ctx.extra
        w = decompress(crow, col, values, in_features)
        gv = None
        if ctx.needs_input_grad[3]:
            gv = values_grad(_dense_grad_w(x, grad), crow, col, values, in_features).to(values.dtype)
        gx, gv, gb = _finish(ctx, grad, x, w, gv)
        return gx, None, None, gv, None, gb
    return backward


_csr_backward = _compressed_backward(formats.decompress_csr, _csr_values_grad)
_bsr_backward = _compressed_backward(formats.decompress_bsr, _bsr_values_grad)


torch.library.register_autograd("peft_ext::sparse24_linear", _sparse24_backward, setup_context=_setup(1))
torch.library.register_autograd("peft_ext::csr_linear", _csr_backward, setup_context=_setup(3))
torch.library.register_autograd("peft_ext::bsr_linear", _bsr_backward, setup_context=_setup(3))
