// What qgemv_avx512.cpp and qgemv_avx2.cpp share, written once over a vector type V (Vec16 or Vec8) and included
// after each file's pragma and vector header: the activations' quantization (qgemv.h's QuantizedRows), the
// store of a tile's results and the walk over activation rows in register-sized passes. Their dot-product kernels differ (VNNI against maddubs)
// and stay in those files.
#pragma once
#include <cstdint>
#include <type_traits>

#include "qgemv.h"

namespace ir {
namespace {

// x [M, K] float32 (bfloat16 when `bf16`), rows [m0, m1), per block of `block` elements (a multiple of V::N):
// q = round(x / d) with d = max|x| / 127, and per block d, the sum of q and the sum of x
template <typename V>
void quantize_rows(const void* x, bool bf16, int64_t K, int64_t block, int64_t m0, int64_t m1, int8_t* q,
                   float* d, int32_t* qsum, float* xsum) {
  using F = typename V::F;
  const int64_t nb = K / block;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = m * K + b * block;
      const float* xf = static_cast<const float*>(x) + at;
      const uint16_t* xh = static_cast<const uint16_t*>(x) + at;
      F amax = V::zero(), sum = V::zero();
      for (int64_t k = 0; k < block; k += V::N) {
        const F v = bf16 ? V::load(xh + k) : V::load(xf + k);
        amax = V::max(amax, V::abs(v));
        sum = V::add(sum, v);
      }
      const float scale = V::hmax(amax) / 127.0f;
      const F inv = V::set1(scale > 0 ? 1.0f / scale : 0.0f);
      typename V::I qs = V::zero_i();
      for (int64_t k = 0; k < block; k += V::N) {
        const typename V::I r = V::round(V::mul(bf16 ? V::load(xh + k) : V::load(xf + k), inv));  // in [-127, 127]
        qs = V::add(qs, r);
        V::store_i8(q + at + k, r);
      }
      d[m * nb + b] = scale;
      qsum[m * nb + b] = V::hsum(qs);
      xsum[m * nb + b] = V::hsum(sum);
    }
  }
}

// out[m] (x per-row scales, when given) + bias for the MB activation rows of output rows n0..n0+V::N-1, into
// y [M, N] float32 or bfloat16; the last tile of a row count N not a multiple of V::N cut short
template <typename V, int MB>
void store_rows(const typename V::F (&out)[MB], const float* scales, const float* bias, void* y, bool bf16,
                int64_t m0, int64_t N, int64_t n0) {
  const int64_t n = N - n0 < V::N ? N - n0 : V::N;
  if (n <= 0) return;
  const typename V::F b = bias ? V::load_first(bias + n0, n, 0.0f) : V::zero();
  const typename V::F s = scales ? V::load(scales + n0) : V::zero();  // scales padded to whole tiles
  for (int m = 0; m < MB; ++m) {
    const typename V::F v = scales ? V::fmadd(out[m], s, b) : V::add(out[m], b);
    const int64_t at = (m0 + m) * N + n0;
    if (bf16)
      V::store(static_cast<uint16_t*>(y) + at, v, n);
    else
      V::store(static_cast<float*>(y) + at, v, n);
  }
}

template <int R, typename Fn>
void rows_left(int64_t left, int64_t m0, Fn& f) {
  if constexpr (R > 0) {
    if (left == R) f(std::integral_constant<int, R>{}, m0);
    else rows_left<R - 1>(left, m0, f);
  }
}

// f(MB, m0) over the M activation rows: passes of MAX rows (as many as keep a pass's accumulators in registers),
// then one of the rows left; MB is a compile-time constant (std::integral_constant)
template <int MAX, typename Fn>
void by_rows(int64_t M, Fn&& f) {
  int64_t m0 = 0;
  for (; m0 + MAX <= M; m0 += MAX) f(std::integral_constant<int, MAX>{}, m0);
  rows_left<MAX - 1>(M - m0, m0, f);
}

}  // namespace
}  // namespace ir
