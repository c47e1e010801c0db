"""Pure-PyTorch references of every peft_ext op. Tests compare the kernels
against these; they also document the exact arithmetic each kernel performs."""
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


# --- sparse: compressed weight formats (layouts in csrc/cpu/sparse_kernels.h)
# and the sparse linear ops. Pure PyTorch; SparseLinear converts with these.

def _crow(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


def compress_24(weight: torch.Tensor, mask: torch.Tensor):
    """(values [N, K/2], indices uint8 [N, ceil(K/8)]) keeping, in every group of
    four columns, the two positions the mask marks (groups with fewer marks
    keep extra zeros-by-mask so that every group stores exactly two)."""
    n, k = weight.shape
    groups = mask.reshape(n, k // 4, 4).to(torch.int8)
    pos = torch.argsort(groups, dim=2, descending=True, stable=True)[..., :2].sort(dim=2).values
    cols = (torch.arange(k // 4, device=weight.device)[None, :, None] * 4 + pos).reshape(n, k // 2)
    values = (weight * mask).gather(1, cols)
    p = pos.reshape(n, k // 2).to(torch.uint8)
    p = torch.nn.functional.pad(p, (0, (-p.shape[1]) % 4)).reshape(n, -1, 4)
    indices = p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)
    return values.contiguous(), indices.contiguous()


def columns_24(indices: torch.Tensor, half: int) -> torch.Tensor:
    """Column of every kept value, [N, K/2] int64."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=indices.device)
    pos = ((indices[..., None] >> shifts) & 3).reshape(indices.shape[0], -1)[:, :half].long()
    return torch.arange(half, device=indices.device)[None, :] // 2 * 4 + pos


def decompress_24(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    n, half = values.shape
    w = values.new_zeros(n, 2 * half)
    return w.scatter_(1, columns_24(indices, half), values)


def compress_csr(weight: torch.Tensor, mask: torch.Tensor):
    """(crow int64 [N + 1], col int32 [nnz], values [nnz]) of the masked entries."""
    nz = mask.nonzero()
    counts = torch.bincount(nz[:, 0], minlength=weight.shape[0])
    return _crow(counts), nz[:, 1].to(torch.int32).contiguous(), weight[mask].contiguous()


def decompress_csr(crow, col, values, in_features):
    n = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), crow.diff())
    w = values.new_zeros(n, in_features)
    w[rows, col.long()] = values
    return w


def compress_bsr(weight: torch.Tensor, mask: torch.Tensor, block):
    """(crow int64 [N/bh + 1], col int32 [nnzb], values [nnzb, bh, bw]) of the
    blocks holding at least one masked-in entry."""
    bh, bw = block
    n, k = weight.shape
    blocks = (weight * mask).reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3)
    keep = mask.reshape(n // bh, bh, k // bw, bw).any(dim=3).any(dim=1)
    nz = keep.nonzero()
    counts = torch.bincount(nz[:, 0], minlength=n // bh)
    return _crow(counts), nz[:, 1].to(torch.int32).contiguous(), blocks[keep].contiguous()


def decompress_bsr(crow, col, values, in_features):
    nnzb, bh, bw = values.shape
    r = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(r, device=values.device), crow.diff())
    blocks = values.new_zeros(r, in_features // bw, bh, bw)
    blocks[rows, col.long()] = values
    return blocks.permute(0, 2, 1, 3).reshape(r * bh, in_features)


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
