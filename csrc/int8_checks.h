// Argument checks shared by the CPU and CUDA int8 ops (the generic ones, float
// input and bias, live in linear_common.h).
#pragma once

#include <ATen/ATen.h>

#include "linear_common.h"

namespace peft_ext {

// int32 accumulation of int8 x int8 products is exact while every partial sum
// fits: activations are quantized to [-127, 127] but a weight loaded from
// elsewhere may hold -128, so |product| <= 128 * 127 and
// K <= floor((2^31 - 1) / (128 * 127)) = 132104. The one definition: Python
// reads it through build_info() ("max_exact_k").
constexpr int64_t kMaxExactK = 132104;
static_assert(kMaxExactK * 128 * 127 <= INT32_MAX && (kMaxExactK + 1) * 128 * 127 > INT32_MAX);

inline void check_int8_weight(const at::Tensor& weight, const at::Tensor& weight_scale) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, "weight must be int8, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
                    weight.dim(), "-D");
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK_TYPE(weight_scale.scalar_type() == at::kFloat, "weight_scale must be float32, got ",
                   weight_scale.scalar_type());
  TORCH_CHECK_VALUE(weight_scale.dim() == 1 && weight_scale.size(0) == weight.size(0),
                    "weight_scale must have shape [", weight.size(0), "], got ",
                    weight_scale.sizes());
  TORCH_CHECK_VALUE(weight_scale.is_contiguous(), "weight_scale must be contiguous");
  TORCH_CHECK_VALUE(weight_scale.device() == weight.device(), "weight_scale is on ",
                    weight_scale.device(), " but weight is on ", weight.device());
}

inline void check_int8_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& weight_scale,
                                   const c10::optional<at::Tensor>& bias, bool check_k_overflow) {
  check_float_input(x, "x");
  check_int8_weight(weight, weight_scale);
  TORCH_CHECK_VALUE(x.device() == weight.device(), "x is on ", x.device(), " but weight is on ",
                    weight.device());
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "x has ", x.size(-1),
                    " features in its last dimension but weight expects in_features=",
                    weight.size(1));
  if (check_k_overflow) {
    TORCH_CHECK_VALUE(weight.size(1) <= kMaxExactK, "in_features=", weight.size(1),
                      " exceeds ", kMaxExactK,
                      ": int32 sums of int8 products could overflow; use weight-only mode");
  }
  check_bias(bias, x, weight.size(0));
}

// grad [..., N] for the weight [N, K] of int8_grad_input (CPU and CUDA).
inline void check_int8_grad_args(const at::Tensor& grad, const at::Tensor& weight,
                                 const at::Tensor& weight_scale) {
  check_float_input(grad, "grad");
  check_int8_weight(weight, weight_scale);
  TORCH_CHECK_VALUE(grad.device() == weight.device(), "grad is on ", grad.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_VALUE(grad.size(-1) == weight.size(0), "grad has ", grad.size(-1),
                    " features in its last dimension but weight has out_features=", weight.size(0));
}

}  // namespace peft_ext
