"""SparseLinear: a drop-in replacement for nn.Linear with a pruned weight
stored compressed and multiplied by kernels that skip the zeros."""
import warnings

import torch
from torch import nn

from .. import formats
from .._modules import is_conv1d
from ..ops import sparse as sparse_ops

PATTERNS = ("2:4", "block", "unstructured")

# Sparsity from which our kernels beat dense fp32 (MKL) at every M measured
# (1, 16, 128; K = N = 4096, 2 threads, AVX2 Zen 3). Unstructured at 80%:
# 0.83x dense at M = 1, 1.73x at M = 128; at 90%: 1.9x and 2.7x. Block 16x16
# at 40%: 1.76x / 1.30x. Below it patch() keeps the pruned layer dense and
# says so.
MIN_SPARSITY = {"2:4": 0.0, "block": 0.4, "unstructured": 0.9}


# CUDA (not yet measured on a GPU: the thresholds are estimates to revisit
# with bench/bench_sparse_cuda.py). 2:4 runs on the sparse tensor cores for
# bf16/fp16 (mma.sp: half the multiply-adds and ~56% of the weight bytes of
# dense); float32 has no sparse tensor-core path, so such layers stay dense.
# The BSR kernel uses the CUDA cores and reads only the stored blocks: it can
# only beat cuBLAS where the weight read dominates, i.e. at high sparsity.
# Unstructured (CSR) has no CUDA kernel (the op densifies per call): dense.
CUDA_MIN_SPARSITY = {"2:4": 0.0, "block": 0.9}


def choose_kernel(pattern, sparsity, device=torch.device("cpu"), dtype=None):
    """(use the sparse kernel?, a label for the report) for a layer of this
    pattern, sparsity, device and dtype. The choice is per layer, made once:
    the op cannot switch per call without keeping a dense copy."""
    name = {"2:4": "2:4 kernel", "block": "BSR kernel", "unstructured": "CSR kernel"}[pattern]
    kind = torch.device(device).type
    if kind == "cuda":
        if pattern == "2:4" and dtype is not None and dtype not in (torch.bfloat16, torch.float16):
            return False, "dense cuBLAS (the CUDA 2:4 kernel needs bfloat16/float16)"
        if pattern not in CUDA_MIN_SPARSITY:
            return False, f"dense cuBLAS (no CUDA {name}; it would densify per call)"
        if sparsity >= CUDA_MIN_SPARSITY[pattern] - 1e-3:
            return True, "2:4 mma.sp kernel (CUDA)" if pattern == "2:4" else "BSR kernel (CUDA)"
        return False, (f"dense cuBLAS (CUDA {name} expected slower below "
                       f"{100 * CUDA_MIN_SPARSITY[pattern]:.0f}% sparsity)")
    if kind != "cpu":
        return False, f"dense ({name}s run on CPU and CUDA only, not {kind})"
    if sparsity >= MIN_SPARSITY[pattern] - 1e-3:  # 90% of an odd count rounds a hair under
        return True, name
    return False, (f"dense at::matmul ({name} slower below "
                   f"{100 * MIN_SPARSITY[pattern]:.0f}% sparsity)")


def _buffers_for(pattern, out_features, in_features, block, nnz, device, dtype):
    """Empty buffers of the right shapes, so load_state_dict can fill a fresh module."""
    z = dict(device=device)
    if pattern == "2:4":
        return {"values": torch.zeros(out_features, in_features // 2, dtype=dtype, **z),
                "indices": formats.empty_indices_24(out_features, in_features, **z)}
    rows = out_features // block[0] if pattern == "block" else out_features
    shape = (nnz, *block) if pattern == "block" else (nnz,)
    return {"crow": torch.zeros(rows + 1, dtype=torch.int64, **z),
            "col": torch.zeros(nnz, dtype=torch.int32, **z),
            "values": torch.zeros(shape, dtype=dtype, **z)}


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W pruned and stored compressed.

    pattern="2:4": buffers `values` [out, in/2] and `indices` uint8 [out,
        ceil(in/8)] (2-bit positions, four per byte); in_features % 4 == 0.
    pattern="block": BSR, `crow` [out/bh + 1], `col` int32 [nnz_blocks],
        `values` [nnz_blocks, bh, bw]; block (bh, bw) must tile the weight.
    pattern="unstructured": CSR, `crow` [out + 1], `col` int32 [nnz], `values` [nnz].

    Not an nn.Linear subclass (tools that write `linear.weight.data` must not
    see a dense weight that is not there). Gradients reach the input and the
    bias; the stored values are frozen unless `train_values=True`, in which
    case `values` is a Parameter and only the kept weights learn (the zeros
    stay zeros by construction).

    Loading a state dict checks the compressed weight against the module's
    shape before any buffer changes (a mismatch, a malformed crow/col, or 2:4
    metadata naming one position twice is refused, strict or not) and stores
    it canonically: 2:4 positions in increasing order within each group, CSR /
    BSR columns in increasing order within each row, so every device's kernel
    and dense_weight() / to_linear() read the same weight.
    """

    weight_requires_grad = True  # what to_linear() gives the dense weight

    def __init__(self, in_features, out_features, bias=True, pattern="2:4", block=(16, 16), nnz=0,
                 train_values=False, device=None, dtype=None):
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        if pattern == "2:4" and in_features % 4:
            raise ValueError(f"pattern '2:4' needs in_features to be a multiple of 4, got {in_features}")
        if pattern == "block" and (out_features % block[0] or in_features % block[1]):
            raise ValueError(f"block {tuple(block)} does not tile the weight {out_features}x{in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.block = pattern, tuple(block)
        self.train_values = train_values
        self._source = "linear"
        dtype = dtype or torch.float32
        for name, t in _buffers_for(pattern, out_features, in_features, self.block, nnz, device, dtype).items():
            if name == "values" and train_values:
                self.values = nn.Parameter(t)
            else:
                self.register_buffer(name, t)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear, pattern="2:4", mask=None, block=(16, 16), train_values=False):
        """Compress an nn.Linear (or transformers Conv1D). mask (bool [out, in],
        True = kept) defaults to the weight's non-zeros; for "2:4" it must keep
        at most two of every four weights of a row (prune first: peft_ext.prune)."""
        conv1d = is_conv1d(linear)
        w = (linear.weight.t() if conv1d else linear.weight).detach()
        out_f, in_f = w.shape
        mask = (w != 0) if mask is None else mask.to(device=w.device, dtype=torch.bool)
        if mask.shape != w.shape:
            raise ValueError(f"mask must have shape {tuple(w.shape)} ([out, in]), got {tuple(mask.shape)}")
        if pattern == "2:4" and in_f % 4 == 0 and (mask.reshape(out_f, -1, 4).sum(2) > 2).any():
            raise ValueError("pattern '2:4': the weight (or mask) keeps more than two of four weights in "
                             "some group; prune it first (peft_ext.prune(model, pattern='2:4'))")
        if pattern == "block" and len(block) != 2:
            raise ValueError(f"block must be (rows, cols), got {block!r}")
        nnz = 0
        if pattern == "unstructured":
            nnz = int(mask.sum())
        elif pattern == "block" and out_f % block[0] == 0 and in_f % block[1] == 0:
            nnz = int(mask.reshape(out_f // block[0], block[0], in_f // block[1], block[1]).any(3).any(1).sum())
        module = cls(in_f, out_f, bias=linear.bias is not None, pattern=pattern, block=block, nnz=nnz,
                     train_values=train_values, device=w.device, dtype=w.dtype)
        if pattern == "2:4":
            parts = formats.compress_24(w, mask)
            names = ("values", "indices")
        elif pattern == "block":
            parts = formats.compress_bsr(w, mask, module.block)
            names = ("crow", "col", "values")
        else:
            parts = formats.compress_csr(w, mask)
            names = ("crow", "col", "values")
        with torch.no_grad():
            for name, t in zip(names, parts):
                getattr(module, name).copy_(t)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
                module.bias.requires_grad_(linear.bias.requires_grad)
        module._source = "conv1d" if conv1d else "linear"
        module.weight_requires_grad = linear.weight.requires_grad
        if module.sparsity == 0 and w.numel():
            warnings.warn(f"SparseLinear.from_linear(pattern={pattern!r}): the layer stores every weight "
                          f"(sparsity 0: not pruned, or no {'block' if pattern == 'block' else 'weight'} is "
                          f"all zeros), so the sparse kernel only adds work; prune it first "
                          f"(peft_ext.prune) or pass mask=", UserWarning, stacklevel=2)
        return module

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the weight not stored (stored zeros count as stored)."""
        return 1 - self.nnz / (self.in_features * self.out_features)

    def dense_weight(self):
        v = self.values.detach()
        if self.pattern == "2:4":
            return formats.decompress_24(v, self.indices)
        if self.pattern == "block":
            return formats.decompress_bsr(self.crow, self.col, v, self.in_features)
        return formats.decompress_csr(self.crow, self.col, v, self.in_features)

    def to_linear(self):
        """An nn.Linear (or the original Conv1D) with the densified weight."""
        weight = self.dense_weight()
        if self._source == "conv1d":
            # transformers is optional: only a layer that came from a Conv1D needs it.
            from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

            layer = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
            layer.weight.data.copy_(weight.t())
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            layer.weight.data.copy_(weight)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
            layer.bias.requires_grad_(self.bias.requires_grad)
        layer.weight.requires_grad_(self.weight_requires_grad)
        return layer

    def forward(self, x):
        if x.device != self.values.device:
            # The ops would trace a meta input through CPU weights instead of failing.
            raise RuntimeError(f"SparseLinear: input is on {x.device} but the weights are on "
                               f"{self.values.device}; move the module or the input")
        if self.pattern == "2:4":
            return sparse_ops.sparse24_linear(x, self.values, self.indices, self.bias)
        if self.pattern == "block":
            return sparse_ops.bsr_linear(x, self.crow, self.col, self.values, self.in_features, self.bias)
        return sparse_ops.csr_linear(x, self.crow, self.col, self.values, self.in_features, self.bias)

    def _compressed_names(self):
        return ("values", "indices") if self.pattern == "2:4" else ("crow", "col", "values")

    def _checked(self, state_dict, prefix):
        """The compressed weight entries of state_dict, checked against this
        module and canonical (new tensors; the caller's dict is not changed).
        Empty when none is present. Raises ValueError."""
        names = self._compressed_names()
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        if not found:
            return {}
        if len(found) != len(names):
            missing = ", ".join(repr(prefix + n) for n in names if n not in found)
            raise ValueError(f"SparseLinear: {missing} missing beside {', '.join(repr(prefix + n) for n in found)}: "
                             f"the parts of a compressed weight load together")
        try:
            if self.pattern == "2:4":
                values, indices = found["values"], found["indices"]
                want = {"values": (self.out_features, self.in_features // 2),
                        "indices": (self.out_features, (self.in_features + 7) // 8)}
                for n, t in found.items():
                    if tuple(t.shape) != want[n]:
                        raise ValueError(f"'{n}' has shape {tuple(t.shape)}, this module "
                                         f"({self.out_features} x {self.in_features}) needs {want[n]}")
                if indices.dtype != torch.uint8:
                    raise ValueError(f"'indices' must be uint8 (packed 2-bit positions), got {indices.dtype}")
                try:
                    values, indices = formats.canonical_24(values, indices)
                except ValueError as e:
                    raise ValueError(f"'indices': {e}") from None
                return {prefix + "values": values, prefix + "indices": indices}
            if self.pattern == "block":
                rows, cols, block = self.out_features // self.block[0], self.in_features // self.block[1], self.block
            else:
                rows, cols, block = self.out_features, self.in_features, None
            crow, col, values = formats.canonical_compressed(found["crow"], found["col"], found["values"],
                                                             rows, cols, block)
        except ValueError as e:
            raise ValueError(f"SparseLinear ({self.pattern}, {self.out_features} x {self.in_features}) "
                             f"cannot load {prefix or 'the state dict'}: {e}") from None
        return {prefix + "crow": crow, prefix + "col": col, prefix + "values": values}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        try:
            checked = self._checked(state_dict, prefix)
        except ValueError as e:  # refuse before any buffer changes; torch raises it, strict or not
            error_msgs.append(str(e))
            return
        if checked:
            state_dict = {**state_dict, **checked}
        # The number of stored values is data: resize the buffers to what is loaded.
        for name in ("crow", "col", "values"):
            t = state_dict.get(prefix + name)
            own = getattr(self, name, None)
            if t is not None and own is not None and t.shape != own.shape:
                new = torch.empty(t.shape, dtype=own.dtype, device=own.device)
                if isinstance(own, nn.Parameter):
                    self.values = nn.Parameter(new, requires_grad=own.requires_grad)
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        shape = f", block={self.block}" if self.pattern == "block" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern}{shape}, sparsity={self.sparsity:.3f}")
