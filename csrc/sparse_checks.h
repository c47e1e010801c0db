// Argument checks shared by the CPU and CUDA sparse linear ops (dtypes,
// shapes, devices). TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface in Python as
// TypeError / ValueError naming the argument. The structural check of crow /
// col (check_rows) reads the indices on the host: the CPU ops run it on every
// call, and so do the CUDA fallbacks that densify the weight (CSR, BSR blocks
// too tall for the kernel), which would otherwise hand malformed indices to
// index_put_ and trip a device-side assert. The BSR kernel does not (a
// device-to-host copy would synchronise every call) and instead never reads
// outside the weight or x (see csrc/cuda/sparse_gemm.cu).
#pragma once

#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "linear_common.h"

namespace peft_ext {

inline void check_sparse_common(const at::Tensor& x, const at::Tensor& values, int64_t K, int64_t N,
                                const c10::optional<at::Tensor>& bias) {
  check_float_input(x, "x");
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), "values must be floating point, got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK_VALUE(x.device() == values.device(), "x is on ", x.device(), " but values are on ",
                    values.device());
  TORCH_CHECK_VALUE(x.size(-1) == K, "x has ", x.size(-1),
                    " features in its last dimension but the weight expects in_features=", K);
  check_bias(bias, x, N);
}

inline void check_sparse_index(const at::Tensor& t, const at::Tensor& x, const char* name,
                               at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel && t.is_contiguous(), name,
                    " must be a contiguous 1-D tensor of ", numel, " elements, got ", t.sizes());
  check_same_device(t, x, name);
}

// 2:4: values [N, K/2], indices uint8 [N, ceil(K/8)]. Returns (N, K).
inline std::pair<int64_t, int64_t> check_sparse24_args(const at::Tensor& x, const at::Tensor& values,
                                                       const at::Tensor& indices,
                                                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) % 2 == 0,
                    "values must be 2-D [out_features, in_features / 2] with an even second dimension, got ",
                    values.sizes());
  const int64_t N = values.size(0), K = 2 * values.size(1);
  check_sparse_common(x, values, K, N, bias);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, "indices must be uint8, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == N && indices.size(1) == (K + 7) / 8 &&
                        indices.is_contiguous(),
                    "indices must be contiguous [", N, ", ", (K + 7) / 8, "], got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.device() == x.device(), "indices are on ", indices.device(), " but x is on ",
                    x.device());
  return {N, K};
}

// CSR: crow int64 [N + 1], col int32 [nnz], values [nnz]. Returns N.
inline int64_t check_csr_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, int64_t in_features,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "crow must be 1-D [out_features + 1]");
  const int64_t N = crow.numel() - 1;
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D [nnz], got ", values.sizes());
  check_sparse_common(x, values, in_features, N, bias);
  check_sparse_index(crow, x, "crow", at::kLong, N + 1);
  check_sparse_index(col, x, "col", at::kInt, values.numel());
  return N;
}

// BSR: crow int64 [N / bh + 1], col int32 [nnzb], values [nnzb, bh, bw]. Returns N.
inline int64_t check_bsr_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, int64_t in_features,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0,
                    "values must be 3-D [nnz_blocks, block_rows, block_cols], got ", values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1, "crow must be 1-D [out_features / block_rows + 1]");
  const int64_t bh = values.size(1), bw = values.size(2), R = crow.numel() - 1, N = R * bh;
  TORCH_CHECK_VALUE(in_features % bw == 0, "in_features=", in_features, " is not a multiple of the block width ",
                    bw);
  check_sparse_common(x, values, in_features, N, bias);
  check_sparse_index(crow, x, "crow", at::kLong, R + 1);
  check_sparse_index(col, x, "col", at::kInt, values.size(0));
  return N;
}

// Compressed-row structure, read on the host (crow / col must be CPU tensors):
// crow from 0 to nnz, non-decreasing, and column indices in [0, cols) and
// ascending within a row (the kernels rely on it). `what` names the stored
// entries ("values" or "blocks").
inline void check_rows(const at::Tensor& crow, const at::Tensor& col, int64_t cols, const char* what) {
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int32_t* c = col.data_ptr<int32_t>();
  const int64_t rows = crow.numel() - 1;
  TORCH_CHECK_VALUE(cr[0] == 0 && cr[rows] == col.numel(), "crow must start at 0 and end at ",
                    col.numel(), " (the number of stored ", what, ")");
  // crow first: with it non-decreasing from 0 to nnz, every row's span lies in col.
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) ok &= cr[r] <= cr[r + 1];
  for (int64_t r = 0; !ok && r < rows; ++r)
    TORCH_CHECK_VALUE(cr[r] <= cr[r + 1], "crow must be non-decreasing (row ", r, ")");
  // This runs on each call, next to a kernel that reads each index once, so
  // it must cost far less than the kernel: columns that ascend strictly within
  // a row, the first >= 0 and the last < cols, are all in range, so one
  // compare of neighbours per index suffices (branch-free, vectorized by the
  // compiler), and rows are split across threads. A second pass names the culprit.
  std::atomic<bool> bad{false};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) * rows / std::max<int64_t>(1, col.numel()));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    int local = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = cr[r], e = cr[r + 1];
      if (s == e) continue;
      local |= static_cast<int>(c[s] < 0) | static_cast<int>(c[e - 1] >= cols);
      for (int64_t p = s + 1; p < e; ++p) local |= static_cast<int>(c[p] <= c[p - 1]);
    }
    if (local != 0) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = cr[r]; p < cr[r + 1]; ++p) {
      TORCH_CHECK_VALUE(c[p] >= 0 && c[p] < cols, "col[", p, "]=", c[p], " is outside [0, ", cols, ")");
      TORCH_CHECK_VALUE(p == cr[r] || c[p] > c[p - 1], "col must ascend within each row (row ", r, ")");
    }
  }
}

}  // namespace peft_ext
