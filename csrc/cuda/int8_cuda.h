// What the CUDA int8 translation units share: the op entry points (all
// registered in one TORCH_LIBRARY_IMPL, in int8_gemm.cu) and the launchers
// one file calls in another (int8_quant.cu, int8_gemm.cu, int8_gemv.cu).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "common.cuh"

namespace peft_ext::cuda {

// Ops (schemas in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x);
at::Tensor int8_dequantize_cuda(const at::Tensor& weight, const at::Tensor& weight_scale,
                                at::ScalarType dtype);
at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias);
// grad [..., N] @ dequant(weight) without a float copy of the weight (int8_grad.cu).
at::Tensor int8_grad_input_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                const at::Tensor& weight_scale);
at::Tensor int8_linear_weight_only_cuda(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& weight_scale,
                                        const std::optional<at::Tensor>& bias);

// Per-token quantization of x2d [M, K] (contiguous, float/bf16/half) into
// q [M, ldq] int8 (columns K..ldq-1 zero) and scale [M] float32, one kernel,
// on the current stream. ldq >= K. Semantics: docs in int8_quant.cu.
void quantize_rows(const at::Tensor& x2d, int64_t ldq, at::Tensor& q, at::Tensor& scale);

// Output rows at most this many go to the GEMV kernels (int8_gemv.cu): they
// stream the weight once for all rows; beyond it a tensor-core GEMM wins.
constexpr int64_t kGemvMaxM = 16;

// y[m, n] = sum_k q[m, k] * w[n, k] (exact int32) * sx[m] * sw[n] + bias[n],
// M <= kGemvMaxM. q has row stride ldq. out is [M, N] contiguous in x's dtype.
void gemv_s8(const at::Tensor& q, int64_t ldq, const at::Tensor& sx, const at::Tensor& w,
             const at::Tensor& sw, const at::Tensor& bias, at::Tensor& out);

// y[m, n] = sum_k x[m, k] * w[n, k] (fp32) * sw[n] + bias[n], M <= kGemvMaxM,
// x contiguous [M, K] float/bf16/half; out [M, N] contiguous in x's dtype.
void gemv_weight_only(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& sw,
                      const at::Tensor& bias, at::Tensor& out);

// w * sw[:, None] in float32, bfloat16 or float16 (one elementwise kernel).
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& sw, at::ScalarType dtype);

}  // namespace peft_ext::cuda
