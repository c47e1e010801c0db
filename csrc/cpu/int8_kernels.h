// CPU int8 kernels shared by the dispatcher (int8_gemm.cpp) and the C++ tests.
// Layouts: activations are quantized into rows of `ldq` bytes (ldq a multiple of
// 32, zero padded past K) as signed values q and their magnitudes |q|; weights
// are plain row-major int8 [N, K], the layout the dot-product kernels stream.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace peft_ext::cpu {


// Writes y[m, n] = acc * row_scale[m] * col_scale[n] + bias[n] in the output
// dtype; row_scale is null for weight-only (acc is then already a float dot
// product with the unscaled int8 weight).
struct Epilogue {
  const float* row_scale;
  const float* col_scale;
  const float* bias;  // may be null
  void* out;
  int64_t ldo;
  c10::ScalarType dtype;

  inline void store(int64_t m, int64_t n, float acc) const {
    float v = acc;
    if (row_scale != nullptr) v *= row_scale[m];
    v *= col_scale[n];
    if (bias != nullptr) v += bias[n];
    const int64_t i = m * ldo + n;
    switch (dtype) {
      case c10::ScalarType::BFloat16:
        static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v);
        break;
      case c10::ScalarType::Half:
        static_cast<c10::Half*>(out)[i] = c10::Half(v);
        break;
      default:
        static_cast<float*>(out)[i] = v;
    }
  }
};

// Per-row symmetric quantization of float rows x[M, K] (row stride ldx):
// scale = absmax / 127, q = round_half_even(x * (1 / scale)), all-zero rows get
// scale 0 and q 0. Writes q, |q| (both padded with zeros up to ldq) and scale.
void quantize_rows_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                          uint8_t* aq, int64_t ldq, float* scale);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                        uint8_t* aq, int64_t ldq, float* scale);

// W8A8 output columns [n0, n1) for all M rows: exact int32 dot products of the
// quantized rows with weight rows w[n], then ep.store.
void gemm_s8_scalar(const int8_t* q, const uint8_t* aq, int64_t ldq, const int8_t* w,
                    int64_t M, int64_t K, int64_t n0, int64_t n1, const Epilogue& ep);
void gemm_s8_avx2(const int8_t* q, const uint8_t* aq, int64_t ldq, const int8_t* w,
                  int64_t M, int64_t K, int64_t n0, int64_t n1, const Epilogue& ep);

// W8A8 for many rows: packs 16 weight rows at a time into an outer-product
// panel (one pass over the weight per call) and multiplies 4 rows at a time.
void gemm_s8_packed_avx2(const int8_t* q, const uint8_t* aq, int64_t ldq, const int8_t* w,
                         int64_t M, int64_t K, int64_t n0, int64_t n1, const Epilogue& ep);

// Weight-only output columns [n0, n1): float rows x[M, K] (stride ldx) dotted
// with int8 weight rows converted to float in registers, then ep.store.
void gemm_wo_scalar(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                    int64_t n0, int64_t n1, const Epilogue& ep);
void gemm_wo_avx2(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                  int64_t n0, int64_t n1, const Epilogue& ep);

}  // namespace peft_ext::cpu
