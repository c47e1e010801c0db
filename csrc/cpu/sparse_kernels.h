// CPU sparse-weight kernels shared by the dispatcher (sparse_gemm.cpp) and the
// AVX2 file. Weight formats (N = out_features, K = in_features):
//   2:4   values float [N, K/2] (the two kept weights of every group of four
//         columns, in column order) and indices uint8 [N, ceil(K/8)]: the
//         2-bit position of kept value j inside its group sits in byte j / 4
//         at bit 2 * (j % 4). Kept value j belongs to group j / 2, column
//         4 * (j / 2) + position.
//   CSR   crow int64 [N + 1], col int32 [nnz], values float [nnz].
//   BSR   crow int64 [N / bh + 1], col int32 [nnzb] (block column),
//         values float [nnzb, bh, bw].
// "Row" kernels read x [M, K] (row stride ldx) and write y [M, N] (stride
// ldy): best for few rows. "Transposed" kernels read xT [K, ldt] (x
// transposed, rows padded to ldt, a multiple of 8) and accumulate into a
// zeroed yT [N, ldt]: every stored weight then drives a whole vector of
// activation rows, which keeps the FMA units busy for large M.
#pragma once

#include <cstdint>

namespace peft_ext::cpu {

struct Sp24 {
  const float* values;
  const uint8_t* indices;
  int64_t K;
};

struct Csr {
  const int64_t* crow;
  const int32_t* col;
  const float* values;
};

struct Bsr {
  const int64_t* crow;
  const int32_t* col;
  const float* values;
  int64_t bh, bw;
};

inline int64_t sp24_column(const uint8_t* idx_row, int64_t j) {
  return 4 * (j >> 1) + ((idx_row[j >> 2] >> (2 * (j & 3))) & 3);
}

// Output rows [n0, n1) of the weight (block rows [n0, n1) for BSR).
void sp24_rows_scalar(const float* x, int64_t ldx, int64_t M, const Sp24& w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);
void sp24_rows_avx2(const float* x, int64_t ldx, int64_t M, const Sp24& w, int64_t n0, int64_t n1,
                    float* y, int64_t ldy);
void sp24_transposed_avx2(const float* xT, int64_t ldt, const Sp24& w, int64_t n0, int64_t n1, float* yT);

void csr_rows_scalar(const float* x, int64_t ldx, int64_t M, const Csr& w, int64_t n0, int64_t n1,
                     float* y, int64_t ldy);
void csr_transposed_avx2(const float* xT, int64_t ldt, const Csr& w, int64_t n0, int64_t n1, float* yT);

void bsr_rows_scalar(const float* x, int64_t ldx, int64_t M, const Bsr& w, int64_t r0, int64_t r1,
                     float* y, int64_t ldy);
void bsr_rows_avx2(const float* x, int64_t ldx, int64_t M, const Bsr& w, int64_t r0, int64_t r1,
                   float* y, int64_t ldy);
void bsr_transposed_avx2(const float* xT, int64_t ldt, const Bsr& w, int64_t r0, int64_t r1, float* yT);

}  // namespace peft_ext::cpu
