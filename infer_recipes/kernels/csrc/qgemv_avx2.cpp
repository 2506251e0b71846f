// The AVX2 kernels, for CPUs without AVX-512 VNNI: the same layouts and arithmetic as qgemv_avx512.cpp, with
// the dot products of unsigned and signed bytes by maddubs (pairs into int16) and madd (into int32), as llama.cpp
// does on AVX2. Compiled for that instruction set by the pragma below, called only after a run-time check.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "vec8.h"
// the pragma and the vector type first: what is shared is compiled for them
#include "qgemv_impl.h"

namespace ir {
namespace {

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One half of a 16-row tile (output rows 8h..8h+7: bytes 32h..32h+31 of each 64-byte run), all groups.
// maddubs(w in [0, 15], x in [-127, 127]) is at most 3810 per int16 pair, so the products of 4 runs (8 pairs)
// add up in int16 without overflow before one madd widens them.
template <int MB, int GROUP>
void int4_half(const QuantizedRows& x, int64_t m0, const uint8_t* w, const uint16_t* sz, const float* bias,
               void* y, bool bf16, int64_t N, int64_t n0, int h) {
  constexpr int chunks = GROUP / 8;
  const int64_t G = x.K / GROUP;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
    const uint8_t* wg = w + g * chunks * 64 + 32 * h;
    for (int c0 = 0; c0 < chunks; c0 += 4) {
      __m256i a16[MB];
      for (int m = 0; m < MB; ++m) a16[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int c = c0; c < c0 + 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 64));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        const int8_t* xp = x.q + m0 * x.K + g * GROUP + c * 8;
        for (int m = 0; m < MB; ++m) {
          a16[m] = _mm256_add_epi16(a16[m], _mm256_maddubs_epi16(lo, bcast4(xp + m * x.K)));
          a16[m] = _mm256_add_epi16(a16[m], _mm256_maddubs_epi16(hi, bcast4(xp + m * x.K + 4)));
        }
      }
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(a16[m], ones));
    }
    const uint16_t* sg = sz + g * 32 + 8 * h;
    const __m256 S = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
    const __m256 Z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + 16)));
    for (int m = 0; m < MB; ++m) {
      const int64_t i = (m0 + m) * G + g;
      const __m256 a = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m], _mm256_set1_epi32(8 * x.qsum[i])));
      out[m] = _mm256_fmadd_ps(a, _mm256_mul_ps(S, _mm256_set1_ps(x.d[i])), out[m]);
      out[m] = _mm256_fmadd_ps(Z, _mm256_set1_ps(x.xsum[i]), out[m]);
    }
  }
  store_rows<Vec8>(out, nullptr, bias, y, bf16, m0, N, n0 + 8 * h);
}

// The int8 layout holds q + 128; flipping the top bit gives q back, signed. maddubs wants one unsigned operand,
// so it multiplies |x| by q with x's sign (at most 2 x 127 x 127 per int16 pair: no saturation).
template <int MB>
void int8_half(const QuantizedRows& x, int64_t m0, const uint8_t* w, const float* scales, const float* bias,
               void* y, bool bf16, int64_t N, int64_t n0, int h) {
  const int64_t B = x.K / 32;  // activation blocks of 32: 8 runs of 4 k
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m256i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
    const uint8_t* wb = w + b * 8 * 64 + 32 * h;
    const int8_t* xp = x.q + m0 * x.K + b * 32;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64)), flip);
      for (int m = 0; m < MB; ++m) {
        const __m256i xb = bcast4(xp + m * x.K + c * 4);
        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(xb), _mm256_sign_epi8(v, xb));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(p, ones));
      }
    }
    for (int m = 0; m < MB; ++m)
      out[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(x.d[(m0 + m) * B + b]), out[m]);
  }
  store_rows<Vec8>(out, scales, bias, y, bf16, m0, N, n0 + 8 * h);
}

constexpr int MAX_MB = 4;  // activation rows per pass over a half tile: the accumulators must stay in registers

void int4_tiles(const QuantizedRows& x, const uint8_t* packed, const uint16_t* sz, int64_t group, int64_t N,
                const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1) {
  const int64_t tile_bytes = 16 * x.K / 2, tile_sz = 2 * 16 * (x.K / group);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* w = packed + t * tile_bytes;
    const uint16_t* s = sz + t * tile_sz;
    for (int h = 0; h < 2 && t * 16 + 8 * h < N; ++h) {
      by_rows<MAX_MB>(x.M, [&](auto mb, int64_t m0) {
        constexpr int MB = decltype(mb)::value;
        if (group == 32) int4_half<MB, 32>(x, m0, w, s, bias, y, bf16_out, N, t * 16, h);
        else if (group == 64) int4_half<MB, 64>(x, m0, w, s, bias, y, bf16_out, N, t * 16, h);
        else int4_half<MB, 128>(x, m0, w, s, bias, y, bf16_out, N, t * 16, h);
      });
    }
  }
}

void int8_tiles(const QuantizedRows& x, const uint8_t* packed, const float* scales, int64_t N,
                const float* bias, void* y, bool bf16_out, int64_t t0, int64_t t1) {
  const int64_t tile_bytes = 16 * x.K;
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2 && t * 16 + 8 * h < N; ++h) {
      by_rows<MAX_MB>(x.M, [&](auto mb, int64_t m0) {
        int8_half<decltype(mb)::value>(x, m0, packed + t * tile_bytes, scales, bias, y, bf16_out, N, t * 16, h);
      });
    }
  }
}

}  // namespace

const Qgemv qgemv_avx2 = {quantize_rows<Vec8>, int4_tiles, int8_tiles};

}  // namespace ir
