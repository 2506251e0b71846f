// Vec16: 16 float32 lanes (AVX-512), loaded from and stored to float32, bfloat16 or int8 memory, for the AVX-512
// files. Vec8 (vec8.h) is its AVX2 twin with the same members, so a kernel written once over `V` (attention_impl.h,
// elementwise_impl.h, qgemv_impl.h) compiles for either; only the instructions of each member differ.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "vec_math.h"

namespace ir {

struct Vec16 : VecMath<Vec16> {
  using F = __m512;
  using I = __m512i;
  static constexpr int N = 16;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a b + c
  static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }  // a b - c

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const uint16_t* p) {
    const I u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static F load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // lanes n.. (n <= N) read as `fill`, not from memory
  static F load_first(const float* p, int64_t n, float fill) {
    return _mm512_mask_loadu_ps(set1(fill), first(n), p);
  }
  static F keep_first(F v, int64_t n) { return _mm512_maskz_mov_ps(first(n), v); }  // lanes n.. zeroed

  // N floats -> N bfloat16, round to nearest even (no AVX512-BF16 needed)
  static __m256i to_bf16(F v) {
    I u = _mm512_castps_si512(v);
    const I lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(uint16_t* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  // the first n lanes only (the last, partial tile of a row)
  static void store(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static void store(uint16_t* p, F v, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), to_bf16(v)); }

  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  // the sums of four vectors' lanes as the four lanes of one: a third of four hsums' work (attention's scores)
  static __m128 hsum4(F a, F b, F c, F d) {
    const F ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const F cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    // 128-bit lanes [a, b, c, d], each four partial sums of its vector; transposed so lane i holds the i-th of each
    const F abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    const F t = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), abcd);
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }

  static I zero_i() { return _mm512_setzero_si512(); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I round(F v) { return _mm512_cvtps_epi32(v); }  // to nearest even
  static int32_t hsum(I v) { return _mm512_reduce_add_epi32(v); }
  static void store_i8(int8_t* p, I v) {  // saturated to [-128, 127]
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(v));
  }

  static F round_nearest(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F ldexp(F p, F n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral

 private:
  static __mmask16 first(int64_t n) { return n >= N ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
};

}  // namespace ir
