// The AVX-512 VNNI kernels. Compiled for that instruction set by the pragma below (the rest of the extension is
// not), and only called after a run-time check of the CPU (ops.cpp).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "vec.h"
// the pragma and the vector type first: what is shared is compiled for them
#include "qgemv_impl.h"

namespace ir {
namespace {

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Weight bytes asked for ahead of the ones read, by the first pass over a tile when there are several activation
// rows: that pass multiplies long enough per byte that the hardware prefetcher alone leaves it waiting on memory
// (measured: 1.06-1.14x per call cold at 16 rows; at 1 row no gain, so that loop is left as it was).
constexpr int PREFETCH = 4096;

// Independent accumulators per activation row: one VNNI product waits ~5 cycles for the previous one into the
// same register, so a single row needs several chains to keep loads streaming.
template <int MB>
constexpr int chains() { return MB == 1 ? 4 : MB == 2 ? 2 : 1; }

template <int MB, int NA>
void zero(__m512i (&acc)[MB][NA]) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm512_setzero_si512();
}

template <int NA>
__m512i chain_sum(const __m512i (&acc)[NA]) {
  __m512i sum = acc[0];
  for (int j = 1; j < NA; ++j) sum = _mm512_add_epi32(sum, acc[j]);
  return sum;
}

template <int MB, int GROUP>
void int4_tile(const QuantizedRows& x, int64_t m0, const uint8_t* w, const uint16_t* sz, const float* bias,
               void* y, bool bf16, int64_t N, int64_t n0) {
  constexpr int NA = chains<MB>(), chunks = GROUP / 8, group = GROUP;
  const int64_t G = x.K / group;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MB][NA];
    zero(acc);
    const uint8_t* wg = w + g * chunks * 64;
#pragma GCC unroll 16
    for (int c = 0; c < chunks; ++c) {
      if (m0 == 0 && x.M > 1) __builtin_prefetch(wg + c * 64 + PREFETCH, 0, 3);
      const __m512i v = _mm512_loadu_si512(wg + c * 64);
      const __m512i lo = _mm512_and_si512(v, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const int8_t* xp = x.q + m0 * x.K + g * group + c * 8;
      const int j = (2 * c) % NA, j2 = (2 * c + 1) % NA;
      for (int m = 0; m < MB; ++m) {
        acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], lo, bcast4(xp + m * x.K));
        acc[m][j2] = _mm512_dpbusd_epi32(acc[m][j2], hi, bcast4(xp + m * x.K + 4));
      }
    }
    const __m512 S = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + g * 32)));
    const __m512 Z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + g * 32 + 16)));
    for (int m = 0; m < MB; ++m) {
      const int64_t i = (m0 + m) * G + g;
      const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(chain_sum(acc[m]), _mm512_set1_epi32(8 * x.qsum[i])));
      out[m] = _mm512_fmadd_ps(a, _mm512_mul_ps(S, _mm512_set1_ps(x.d[i])), out[m]);
      out[m] = _mm512_fmadd_ps(Z, _mm512_set1_ps(x.xsum[i]), out[m]);
    }
  }
  store_rows<Vec16>(out, nullptr, bias, y, bf16, m0, N, n0);
}

template <int MB>
void int8_tile(const QuantizedRows& x, int64_t m0, const uint8_t* w, const float* scales, const float* bias,
               void* y, bool bf16, int64_t N, int64_t n0) {
  constexpr int NA = chains<MB>();
  const int64_t B = x.K / 32;  // activation blocks of 32: 8 chunks of 4 k
  __m512 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i acc[MB][NA];
    zero(acc);
    const uint8_t* wb = w + b * 8 * 64;
    const int8_t* xp = x.q + m0 * x.K + b * 32;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      if (m0 == 0 && x.M > 1) __builtin_prefetch(wb + c * 64 + PREFETCH, 0, 3);
      const __m512i v = _mm512_loadu_si512(wb + c * 64);
      for (int m = 0; m < MB; ++m)
        acc[m][c % NA] = _mm512_dpbusd_epi32(acc[m][c % NA], v, bcast4(xp + m * x.K + c * 4));
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t i = (m0 + m) * B + b;
      const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(chain_sum(acc[m]), _mm512_set1_epi32(128 * x.qsum[i])));
      out[m] = _mm512_fmadd_ps(a, _mm512_set1_ps(x.d[i]), out[m]);
    }
  }
  store_rows<Vec16>(out, scales, bias, y, bf16, m0, N, n0);
}

// activation rows per pass over a tile: a batch-16 step in one pass, so a tile's weights are unpacked once, not
// three times (16 accumulators and 16 sums: the 32 registers). Measured against 6 at 16 rows, cold, per call:
// int4 1.03-1.13x, int8 1.1-1.25x (/tmp scripts over both builds)
constexpr int MAX_MB = 16;

void int4_tiles(const QuantizedRows& x, const uint8_t* packed, const uint16_t* sz, int64_t group, int64_t N,
                const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1) {
  const int64_t tile_bytes = 16 * x.K / 2, tile_sz = 2 * 16 * (x.K / group);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = packed + t * tile_bytes;
    const uint16_t* s = sz + t * tile_sz;
    by_rows<MAX_MB>(x.M, [&](auto mb, int64_t m0) {
      constexpr int MB = decltype(mb)::value;
      if (group == 32) int4_tile<MB, 32>(x, m0, w, s, bias, y, bf16_out, N, t * 16);
      else if (group == 64) int4_tile<MB, 64>(x, m0, w, s, bias, y, bf16_out, N, t * 16);
      else int4_tile<MB, 128>(x, m0, w, s, bias, y, bf16_out, N, t * 16);
    });
  }
}

void int8_tiles(const QuantizedRows& x, const uint8_t* packed, const float* scales, int64_t N,
                const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1) {
  const int64_t tile_bytes = 16 * x.K;
  for (int64_t t = t0; t < t1; ++t) {
    by_rows<MAX_MB>(x.M, [&](auto mb, int64_t m0) {
      int8_tile<decltype(mb)::value>(x, m0, packed + t * tile_bytes, scales, bias, y, bf16_out, N, t * 16);
    });
  }
}

}  // namespace

const Qgemv qgemv_avx512 = {quantize_rows<Vec16>, int4_tiles, int8_tiles};

}  // namespace ir
