// Vec8: 8 float32 lanes (AVX2 with FMA), the twin of Vec16 (vec.h) with the same members, for the AVX2 files.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace ir {

struct Vec8 : VecMath<Vec8> {
  using F = __m256;
  using I = __m256i;
  static constexpr int N = 8;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F abs(F a) { return _mm256_andnot_ps(set1(-0.0f), a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a b + c
  static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }  // a b - c

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const uint16_t* p) {
    const I u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static F load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // lanes n.. (n <= N) read as `fill`, not from memory
  static F load_first(const float* p, int64_t n, float fill) {
    if (n >= N) return load(p);
    alignas(32) float tmp[N];
    for (int i = 0; i < N; ++i) tmp[i] = i < n ? p[i] : fill;
    return _mm256_load_ps(tmp);
  }
  static F keep_first(F v, int64_t n) {  // lanes n.. zeroed
    const I lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane)));
  }

  // N floats -> N bfloat16, round to nearest even
  static __m128i to_bf16(F v) {
    I u = _mm256_castps_si256(v);
    const I lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));  // each value < 2^16
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(uint16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
  // the first n lanes only (the last, partial tile of a row)
  template <typename T>
  static void store(T* p, F v, int64_t n) {
    if (n >= N) return store(p, v);
    T tmp[N];
    store(tmp, v);
    std::memcpy(p, tmp, n * sizeof(T));
  }

  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static __m128 hsum4(F a, F b, F c, F d) {  // the sums of four vectors' lanes as the four lanes of one
    const F abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  static I zero_i() { return _mm256_setzero_si256(); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I round(F v) { return _mm256_cvtps_epi32(v); }  // to nearest even
  static int32_t hsum(I v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
  static void store_i8(int8_t* p, I v) {  // saturated to [-128, 127]
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(v16, v16));
  }

  static F round_nearest(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F ldexp(F p, F n) {  // p 2^n, n integral and the result a normal float: n put into the exponent bits
    const I e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(p, _mm256_castsi256_ps(e));
  }
};

}  // namespace ir
