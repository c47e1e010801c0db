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


def positions_24(indices: torch.Tensor, half: int) -> torch.Tensor:
    """The 2-bit position (0..3 inside its group of four) of every kept value, [N, K/2] uint8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=indices.device)
    return ((indices[..., None] >> shifts) & 3).reshape(indices.shape[0], -1)[:, :half]


def pack_24(pos: torch.Tensor) -> torch.Tensor:
    """Inverse of positions_24: four 2-bit positions per byte, padding bits 0."""
    p = pos.to(torch.uint8)
    p = torch.nn.functional.pad(p, (0, (-p.shape[1]) % 4)).reshape(p.shape[0], -1, 4)
    return (p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)).contiguous()


def empty_indices_24(n: int, k: int, device=None) -> torch.Tensor:
    """Valid metadata for an all-zero 2:4 weight: positions (0, 1) in every group."""
    return pack_24(torch.tensor([0, 1], dtype=torch.uint8, device=device).repeat(n, k // 4))


def canonical_24(values: torch.Tensor, indices: torch.Tensor):
    """(values, indices) with the two positions of every group in increasing
    order (p0 < p1, values swapped with them) and zero padding bits: the form
    compress_24 writes and every kernel (CPU, CUDA mma.sp metadata) and
    decompress_24 read alike. Raises ValueError for a group that names one
    position twice (the kernels would add both values, a dense copy keeps one)."""
    n, half = values.shape
    pos = positions_24(indices, half).reshape(n, half // 2, 2)
    dup = pos[..., 0] == pos[..., 1]
    if dup.any():
        row, group = (int(i) for i in dup.nonzero()[0])
        raise ValueError(f"a group of four columns names position {int(pos[row, group, 0])} twice "
                         f"(row {row}, group {group}, {int(dup.sum())} such group(s)); 2:4 metadata "
                         f"must name two different positions per group")
    swap = pos[..., 0] > pos[..., 1]
    if swap.any():
        pos = torch.where(swap[..., None], pos.flip(2), pos)
        values = torch.where(swap[..., None], values.reshape(n, half // 2, 2).flip(2),
                             values.reshape(n, half // 2, 2)).reshape(n, half)
    return values.contiguous(), pack_24(pos.reshape(n, half))


def columns_24(indices: torch.Tensor, half: int) -> torch.Tensor:
    """Column of every kept value, [N, K/2] int64."""
    pos = positions_24(indices, half).long()
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


def canonical_compressed(crow, col, values, rows, cols, block=None):
    """(crow, col, values) of a CSR (block None) or BSR weight with `rows` rows
    (of blocks) and `cols` columns (of blocks), checked and with every row's
    columns in increasing order. Raises ValueError naming the entry at fault:
    a malformed index would make the kernels and a dense copy disagree."""
    if crow.dim() != 1 or crow.numel() != rows + 1:
        raise ValueError(f"'crow' must have {rows + 1} entries (rows + 1), got shape {tuple(crow.shape)}")
    if crow.is_floating_point() or col.is_floating_point():
        raise ValueError(f"'crow' and 'col' must be integers, got {crow.dtype} and {col.dtype}")
    nnz = col.numel()
    if col.dim() != 1:
        raise ValueError(f"'col' must be 1-D, got shape {tuple(col.shape)}")
    shape = (nnz,) if block is None else (nnz, *block)
    if tuple(values.shape) != shape:
        raise ValueError(f"'values' must have shape {shape} to match 'col' ({nnz} entries), "
                         f"got {tuple(values.shape)}")
    crow = crow.long()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow.diff() < 0).any()):
        raise ValueError(f"'crow' must rise from 0 to the number of stored entries ({nnz}) without falling")
    col = col.long()
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"'col' holds a column outside [0, {cols})")
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), crow.diff())
    key = row * cols + col
    if nnz > 1 and not bool((key.diff() > 0).all()):
        order = torch.argsort(key, stable=True)
        key, col, values = key[order], col[order], values[order]
        if bool((key.diff() == 0).any()):
            raise ValueError("'col' names one column twice in a row")
    return crow, col.to(torch.int32).contiguous(), values.contiguous()


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
