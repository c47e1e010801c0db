"""Compressed weight formats of the sparse ops (layouts in
csrc/cpu/sparse_kernels.h): 2:4 values + packed 2-bit positions, CSR, BSR.
SparseLinear converts with these and the sparse ops' backward densifies with
them; the test oracles in reference.py rebuild dense weights independently."""
import torch


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
