// Argument checks shared by the CPU and CUDA sparse linear ops (dtypes,
// shapes, devices). TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface in Python as
// TypeError / ValueError naming the argument. The structural check of crow /
// col (check_rows) reads the indices on the host: the CPU ops run it on every
// call; the CUDA ops do not (a device-to-host copy would synchronise every
// call) and instead never read outside the weight or x (see bsr_gemm.cu).
#pragma once

#include <ATen/ATen.h>

#include "int8_checks.h"

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
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias must be floating point, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
}

inline void check_sparse_index(const at::Tensor& t, const at::Tensor& x, const char* name,
                               at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel && t.is_contiguous(), name,
                    " must be a contiguous 1-D tensor of ", numel, " elements, got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
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

}  // namespace peft_ext
