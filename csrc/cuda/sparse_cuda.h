// What the CUDA sparse translation units share (sparse24_gemm.cu,
// sparse_gemm.cu): the 2:4 op entry point, registered with the CSR and BSR
// ops in one TORCH_LIBRARY_IMPL (sparse_gemm.cu), and the dense weight
// rebuilt from the 2:4 format with ATen ops on the weight's device, for the
// documented float32 fallback and for tests.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace peft_ext::cuda {

at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                const std::optional<at::Tensor>& bias);

// W [N, K] from values [N, K/2] and packed 2-bit positions [N, ceil(K/8)].
at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& indices);

}  // namespace peft_ext::cuda
