// Helpers shared by the CUDA sparse translation units (sparse24_gemm.cu,
// sparse_gemm.cu): dense weights rebuilt from the compressed formats with ATen
// ops on the weight's device, for the documented fallbacks (float32 2:4, CSR,
// BSR blocks too tall for the block kernel) and for tests.
#pragma once

#include <ATen/ATen.h>

namespace peft_ext::cuda {

// W [N, K] from values [N, K/2] and packed 2-bit positions [N, ceil(K/8)].
at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& indices);

}  // namespace peft_ext::cuda
