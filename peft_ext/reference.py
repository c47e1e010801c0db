"""Pure-PyTorch references of every peft_ext op: oracles for tests and
benchmarks only (no production code, no kernel's backward, imports this).
Tests compare the kernels against these; they also document the exact
arithmetic each kernel performs."""
import torch


def quantize_per_token(x: torch.Tensor):
    """The agreed per-token semantics (every backend matches this exactly): a
    row holding NaN or +-inf gets scale NaN and q 0 (its output row is NaN);
    otherwise scale = absmax / 127 and q = clamp(round_half_even(x / scale),
    -127, 127) with a true fp32 division (1 / scale overflows for absmax below
    ~4e-37); absmax 0 gives scale 0 and q 0, and so does an absmax below
    ~1.8e-43, whose scale absmax / 127 underflows to 0."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    absmax = x2.abs().amax(dim=1) if x2.shape[1] > 0 else x2.new_zeros(x2.shape[0])
    finite = torch.isfinite(x2).all(dim=1)
    scale = torch.where(finite, absmax / 127, torch.full_like(absmax, float("nan")))
    ok = (finite & (scale > 0))[:, None]
    safe = torch.where(ok[:, 0], scale, torch.ones_like(scale))
    q = torch.where(ok, torch.round(x2 / safe[:, None]).clamp_(-127, 127), torch.zeros_like(x2))
    return q.to(torch.int8), scale


def int8_linear(x, weight, weight_scale, bias=None):
    q, s = quantize_per_token(x)
    # float64 holds every int32 sum exactly.
    acc = (q.double() @ weight.double().t()).float()
    y = acc * s[:, None] * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int8_linear_weight_only(x, weight, weight_scale, bias=None):
    w = weight.float() * weight_scale[:, None]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_dequantize(weight, weight_scale, dtype=torch.float32):
    return (weight.float() * weight_scale[:, None]).to(dtype)


def int8_grad_input(grad, weight, weight_scale):
    # float64: the oracle's own rounding stays far below the kernel's.
    g = grad.reshape(-1, grad.shape[-1]).double() * weight_scale.double()
    out = g @ weight.double()
    return out.to(grad.dtype).reshape(*grad.shape[:-1], weight.shape[1])


# --- sparse: dense weights rebuilt from the compressed formats of
# peft_ext/formats.py through torch's own sparse tensors (a second, independent
# reading of the layouts), and the sparse linear ops in float64.

def columns_24(indices: torch.Tensor, half: int) -> torch.Tensor:
    """Column of every kept value, [N, K/2] int64: value j sits in group j // 2
    at the position held by 2-bit field j % 4 of byte j // 4."""
    j = torch.arange(half, device=indices.device)
    fields = indices.long()[:, j // 4]
    return (j // 2) * 4 + fields // (4 ** (j % 4)) % 4


def decompress_24(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    n, half = values.shape
    rows = torch.arange(n, device=values.device).repeat_interleave(half)
    at = torch.stack([rows, columns_24(indices, half).flatten()])
    dense = torch.sparse_coo_tensor(at, values.detach().flatten().double(), (n, 2 * half),
                                    check_invariants=True).to_dense()
    return dense.to(values.dtype)


def decompress_csr(crow, col, values, in_features):
    w = torch.sparse_csr_tensor(crow.long(), col.long(), values.detach().double(),
                                (crow.numel() - 1, in_features), check_invariants=True)
    return w.to_dense().to(values.dtype)


def decompress_bsr(crow, col, values, in_features):
    bh = values.shape[1]
    w = torch.sparse_bsr_tensor(crow.long(), col.long(), values.detach().double(),
                                ((crow.numel() - 1) * bh, in_features), check_invariants=True)
    return w.to_dense().to(values.dtype)


def _sparse_linear(x, w, bias):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def sparse24_linear(x, values, indices, bias=None):
    return _sparse_linear(x, decompress_24(values, indices), bias)


def csr_linear(x, crow, col, values, in_features, bias=None):
    return _sparse_linear(x, decompress_csr(crow, col, values, in_features), bias)


def bsr_linear(x, crow, col, values, in_features, bias=None):
    return _sparse_linear(x, decompress_bsr(crow, col, values, in_features), bias)
