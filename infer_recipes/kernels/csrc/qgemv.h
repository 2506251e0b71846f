// Quantized GEMV/GEMM for few rows: the kernels work on raw pointers over a range of 16-row output tiles, so the
// files that hold them are compiled for their instruction set alone and know nothing of torch. One table per
// instruction set (qgemv_avx512.cpp: VNNI dot products; qgemv_avx2.cpp: maddubs); ops.cpp picks one at run time.
#pragma once
#include <cstdint>

namespace ir {

// Activations quantized per block of `block` elements: xq = round(x / d), d = max|x| / 127; per block also the
// sum of xq (the weights' unsigned offset is taken back out with it) and the exact sum of x (for zero points).
struct QuantizedRows {
  const int8_t* q;      // [M, K]
  const float* d;       // [M, K / block]
  const int32_t* qsum;  // [M, K / block]
  const float* xsum;    // [M, K / block]
  int64_t M, K, block;
};

struct Qgemv {
  // x [M, K] float32 (bf16 when `bf16`) -> the four arrays above, rows [m0, m1).
  void (*quantize_rows)(const void* x, bool bf16, int64_t K, int64_t block, int64_t m0, int64_t m1, int8_t* q,
                        float* d, int32_t* qsum, float* xsum);
  // y [M, N] (float32, or bf16 when `bf16_out`) for the 16-row tiles [t0, t1) of a weight.
  // int4: packed [T, K/g, g/8, 64] bytes (16 rows x 4 k per 64 bytes, the low nibble k..k+3, the high k+4..k+7
  // of each 8), sz [T, K/g, 2, 16] fp16 (scale, zero): W = (q - 8) * scale + zero.
  void (*int4_tiles)(const QuantizedRows& x, const uint8_t* packed, const uint16_t* sz, int64_t group, int64_t N,
                     const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1);
  // int8: packed [T, K/4, 64] bytes of q + 128 (16 rows x 4 k), row scales [T * 16] float: W = q * scale.
  void (*int8_tiles)(const QuantizedRows& x, const uint8_t* packed, const float* scales, int64_t N,
                     const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1);
};

extern const Qgemv qgemv_avx512, qgemv_avx2;

}  // namespace ir
