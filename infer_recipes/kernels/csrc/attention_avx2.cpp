// Decode attention over the paged KV pool on AVX2: attention_avx512.cpp's algorithm (each key and value read once
// per step for the query heads that share it, one pass with an online softmax) in 8-lane vectors and chunks of
// 8 keys. Also the reader of an int8 pool, for every instruction set: a key's scores and a value's weights carry
// its row's scale, so the int8 rows are read as they are, a quarter of float32's bytes.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "attention.h"
#include "vec8.h"

namespace ir {
namespace {

constexpr int MAX_G = 16, MAX_D = 256;

// T: q and out (float or bfloat16 bits); C: the caches (T, or int8_t with a.k_scale / a.v_scale)
template <typename T, typename C>
void one(const AttentionArgs& a, int64_t b, int64_t h) {
  const int64_t G = a.H / a.Hkv, D = a.D, DV = D / 8, len = a.lens[b];
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + h * G * D;
  const C* kc = static_cast<const C*>(a.k_cache);
  const C* vc = static_cast<const C*>(a.v_cache);
  const int64_t* table = a.blocks + b * a.blocks_per_row;
  alignas(32) float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][8], p[MAX_G][8];
  float m[MAX_G], l[MAX_G];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < DV; ++d) {
      _mm256_store_ps(qf[g] + 8 * d, _mm256_mul_ps(vec8::load(q + g * D + 8 * d), _mm256_set1_ps(a.scale)));
      _mm256_store_ps(acc[g] + 8 * d, _mm256_setzero_ps());
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const C* kp[8];
  const C* vp[8];
  float ks[8], vs[8];  // the rows' scales (1 for a float pool)
  for (int64_t c0 = 0; c0 < len; c0 += 8) {
    const int64_t n = len - c0 < 8 ? len - c0 : 8;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = c0 + j, block = table[pos / a.block_size];
      const int64_t row = (block * a.Hkv + h) * a.block_size + pos % a.block_size;
      kp[j] = kc + row * D;
      vp[j] = vc + row * D;
      ks[j] = a.k_scale ? a.k_scale[row] : 1.0f;
      vs[j] = a.v_scale ? a.v_scale[row] : 1.0f;
    }
    for (int64_t j = 0; j < n; ++j) {  // scores: each key row once for all G heads
      __m256 s[MAX_G];
      for (int64_t g = 0; g < G; ++g) s[g] = _mm256_setzero_ps();
      for (int64_t d = 0; d < DV; ++d) {
        const __m256 k = vec8::load(kp[j] + 8 * d);
        for (int64_t g = 0; g < G; ++g) s[g] = _mm256_fmadd_ps(_mm256_load_ps(qf[g] + 8 * d), k, s[g]);
      }
      for (int64_t g = 0; g < G; ++g) sc[g][j] = vec8::hsum(s[g]) * ks[j];
    }
    // lanes past the last key: -inf for the max, 0 after the exponential
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_load_ps(sc[g]), live);
      const float mb = vec8::hmax(s);
      const float mn = mb > m[g] ? mb : m[g];
      const float corr = std::exp(m[g] - mn);  // 0 at the first chunk (m = -inf)
      const __m256 e = _mm256_and_ps(live, vec8::exp(_mm256_sub_ps(s, _mm256_set1_ps(mn))));
      _mm256_store_ps(p[g], e);
      l[g] = l[g] * corr + vec8::hsum(e);
      m[g] = mn;
      if (corr != 1.0f) {
        const __m256 c = _mm256_set1_ps(corr);
        for (int64_t d = 0; d < DV; ++d)
          _mm256_store_ps(acc[g] + 8 * d, _mm256_mul_ps(_mm256_load_ps(acc[g] + 8 * d), c));
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // values: each row once for all G heads
      for (int64_t d = 0; d < DV; ++d) {
        const __m256 v = vec8::load(vp[j] + 8 * d);
        for (int64_t g = 0; g < G; ++g)
          _mm256_store_ps(acc[g] + 8 * d,
                          _mm256_fmadd_ps(_mm256_set1_ps(p[g][j] * vs[j]), v, _mm256_load_ps(acc[g] + 8 * d)));
      }
    }
  }
  T* out = static_cast<T*>(a.out) + (b * a.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const __m256 inv = _mm256_set1_ps(l[g] > 0 ? 1.0f / l[g] : 0.0f);
    for (int64_t d = 0; d < DV; ++d)
      vec8::store(out + g * D + 8 * d, _mm256_mul_ps(_mm256_load_ps(acc[g] + 8 * d), inv));
  }
}

// caches in q's dtype, or (INT8) int8 with their scales
template <bool INT8>
void decode_attention(const AttentionArgs& a, int64_t task0, int64_t task1) {
  for (int64_t t = task0; t < task1; ++t) {
    if (a.bf16)
      one<uint16_t, std::conditional_t<INT8, int8_t, uint16_t>>(a, t / a.Hkv, t % a.Hkv);
    else
      one<float, std::conditional_t<INT8, int8_t, float>>(a, t / a.Hkv, t % a.Hkv);
  }
}

}  // namespace

const DecodeAttention decode_attention_avx2 = decode_attention<false>;
const DecodeAttention decode_attention_int8_avx2 = decode_attention<true>;

}  // namespace ir
