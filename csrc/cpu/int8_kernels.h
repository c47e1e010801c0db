// CPU int8 kernels shared by the dispatcher (int8_gemm.cpp) and the C++ tests.
//
// Activations are quantized into rows of `ldq` bytes (ldq a multiple of 32,
// zero padded past K). Weights come in two layouts:
//  - plain row-major int8 [N, K], what the module stores and the small-M
//    dot-product kernels stream;
//  - packed panels (int8_pack_weight, the same bytes for every ISA tier):
//    panel p holds columns [16p, 16p + 16) as [kq][16][4] int8 with kq =
//    ceil(K / 4): for every group of 4 k, the 4 bytes of each of the 16
//    columns side by side, zero past K and past N. One 64-byte line is one
//    zmm, or two ymm of 8 columns x 4 k: the operand layout of vpdpbusd and of
//    the AVX2 vpmaddubsw kernel alike. After the panels, the int32 column sums
//    (sum over k of w[n, k], 0 past N) that the VNNI tiers need.
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

// Per-row symmetric quantization of float rows x[M, K] (row stride ldx), the
// agreed semantics (reference.quantize_per_token): a row holding NaN or +-inf
// gets scale NaN and q 0; otherwise scale = absmax / 127 and q =
// clamp(round_half_even(x / scale), -127, 127) with a true division (1 / scale
// overflows for absmax below ~4e-37); absmax 0 gives scale 0 and q 0.
// Writes q (zero padded up to ldq) and scale.
void quantize_rows_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                          int64_t ldq, float* scale);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q,
                        int64_t ldq, float* scale);

// W8A8 output columns [n0, n1) for all M rows, plain weight: exact int32 dot
// products of the quantized rows with weight rows w[n], then ep.store.
void gemm_s8_scalar(const int8_t* q, int64_t ldq, const int8_t* w, int64_t M, int64_t K,
                    int64_t n0, int64_t n1, const Epilogue& ep);
void gemm_s8_avx2(const int8_t* q, int64_t ldq, const int8_t* w, int64_t M, int64_t K,
                  int64_t n0, int64_t n1, const Epilogue& ep);

// Weight-only output columns [n0, n1): float rows x[M, K] (stride ldx) dotted
// with int8 weight rows converted to float in registers, then ep.store.
void gemm_wo_scalar(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                    int64_t n0, int64_t n1, const Epilogue& ep);
void gemm_wo_avx2(const float* x, int64_t ldx, const int8_t* w, int64_t M, int64_t K,
                  int64_t n0, int64_t n1, const Epilogue& ep);

// ---- packed panels -------------------------------------------------------
constexpr int64_t kPanelCols = 16;
inline int64_t k_groups(int64_t K) { return (K + 3) / 4; }
inline int64_t panel_count(int64_t N) { return (N + kPanelCols - 1) / kPanelCols; }
inline int64_t panel_bytes(int64_t K) { return k_groups(K) * 4 * kPanelCols; }

// Panels [p0, p1) of the plain weight w[N, K] into dst (panel p0 first).
void pack_panels_scalar(const int8_t* w, int64_t N, int64_t K, int64_t p0, int64_t p1, int8_t* dst);
void pack_panels_avx2(const int8_t* w, int64_t N, int64_t K, int64_t p0, int64_t p1, int8_t* dst);
// sums[j] = sum_k w[n0 + j, k] for n0 + j < N, 0 for the padding up to n1.
void column_sums(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t n1, int32_t* sums);

// One register tile of a packed product: mr rows of activations x (stride
// ldx, 4 * kq bytes each) times np consecutive panels (panel stride ps bytes)
// added into out[i * kTileLd + 16 * p + j] (the driver zeroes it, then calls
// once per block of k), int32, wrapping (modular) sums.
constexpr int kTileLd = 64;
using MicroFn = void (*)(const uint8_t* x, int64_t ldx, int mr, const int8_t* panel, int64_t ps,
                         int np, int64_t kq, int32_t* out);
// One row of up to 16 finished int32 sums through the epilogue.
using StoreRowFn = void (*)(const Epilogue& ep, int64_t m, int64_t n, int64_t nr,
                            const int32_t* acc);

// What a tier's packed kernel needs from the shared driver. `shifted`: the
// micro kernel multiplies unsigned activations (q + 128, vpdpbusd's u8 x s8),
// so the driver feeds it q ^ 0x80 and subtracts 128 * column sum afterwards;
// the sums wrap modulo 2^32, so the result is exact whenever the true sum fits
// int32 (|sum| <= 128 * 127 * K). Otherwise the kernel takes signed q directly.
struct PackedKernel {
  MicroFn micro;
  StoreRowFn store_row;
  int mr_max;  // <= 8
  int np_max;  // <= 4
  bool shifted;
};

// The shared packed driver every tier runs: output columns of panels
// [p0, p1) (`panels` points at panel p0, `sums` at the column sums of column
// 16 * p0, read only when g.shifted) for all M rows of x (stride ldx, the rows
// kernel_rows gives: q, or q ^ 0x80 for a shifted kernel), through ep.
void gemm_panels(const PackedKernel& g, const uint8_t* x, int64_t ldx, int64_t M, int64_t K,
                 int64_t N, const int8_t* panels, const int32_t* sums, int64_t p0, int64_t p1,
                 const Epilogue& ep);

// Scalar: a portable emulation of vpdpbusd (shifted), so every machine tests
// the shift, the column sums and the driver the VNNI tiers use.
PackedKernel packed_kernel_scalar();
PackedKernel packed_kernel_avx2();
PackedKernel packed_kernel_avx_vnni();     // VEX AVX-VNNI or EVEX AVX-512VL form
PackedKernel packed_kernel_avx512_vnni();
void store_row16_avx2(const Epilogue& ep, int64_t m, int64_t n, int64_t nr, const int32_t* acc);

}  // namespace peft_ext::cpu
