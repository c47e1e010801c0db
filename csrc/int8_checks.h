// Argument checks shared by the CPU and CUDA int8 ops. TORCH_CHECK_TYPE and
// TORCH_CHECK_VALUE surface in Python as TypeError and ValueError, naming the
// offending argument.
#pragma once

#include <ATen/ATen.h>

namespace peft_ext {

// int32 accumulation of int8 x int8 products is exact while K * 127 * 127 fits.
constexpr int64_t kMaxInt8Dot = 133144;

inline void check_float_input(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least one dimension");
}

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
    TORCH_CHECK_VALUE(weight.size(1) <= kMaxInt8Dot, "in_features=", weight.size(1),
                      " exceeds ", kMaxInt8Dot,
                      ": int32 sums of int8 products could overflow; use weight-only mode");
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "bias must be floating point, got ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape [",
                      weight.size(0), "], got ", b.sizes());
    TORCH_CHECK_VALUE(b.device() == x.device(), "bias is on ", b.device(), " but x is on ",
                      x.device());
  }
}

}  // namespace peft_ext
