// Decode attention over the paged KV pool, read in place: one query per sequence, the query heads that share a
// K/V head together (each key and value is read once per step), one pass with an online softmax.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "attention.h"
#include "vec.h"

namespace ir {
namespace {

constexpr int MAX_G = 16, MAX_D = 256;

template <typename T>
void one(const AttentionArgs& a, int64_t b, int64_t h) {
  const int64_t G = a.H / a.Hkv, D = a.D, DV = D / 16, len = a.lens[b];
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + h * G * D;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t* table = a.blocks + b * a.blocks_per_row;
  alignas(64) float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][16];
  float m[MAX_G], l[MAX_G];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < DV; ++d) {
      _mm512_store_ps(qf[g] + 16 * d, _mm512_mul_ps(vec::load(q + g * D + 16 * d), _mm512_set1_ps(a.scale)));
      _mm512_store_ps(acc[g] + 16 * d, _mm512_setzero_ps());
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  const T* kp[16];
  const T* vp[16];
  for (int64_t c0 = 0; c0 < len; c0 += 16) {
    const int64_t n = len - c0 < 16 ? len - c0 : 16;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = c0 + j, block = table[pos / a.block_size];
      const int64_t at = ((block * a.Hkv + h) * a.block_size + pos % a.block_size) * D;
      kp[j] = kc + at;
      vp[j] = vc + at;
    }
    for (int64_t j = 0; j < n; ++j) {  // scores: each key row once for all G heads
      __m512 s[MAX_G];
      for (int64_t g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      for (int64_t d = 0; d < DV; ++d) {
        const __m512 k = vec::load(kp[j] + 16 * d);
        for (int64_t g = 0; g < G; ++g) s[g] = _mm512_fmadd_ps(_mm512_load_ps(qf[g] + 16 * d), k, s[g]);
      }
      for (int64_t g = 0; g < G; ++g) sc[g][j] = _mm512_reduce_add_ps(s[g]);
    }
    const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    alignas(64) float p[MAX_G][16];
    for (int64_t g = 0; g < G; ++g) {
      const __m512 s = _mm512_maskz_loadu_ps(live, sc[g]);
      const float mb = _mm512_mask_reduce_max_ps(live, s);
      const float mn = mb > m[g] ? mb : m[g];
      const float corr = std::exp(m[g] - mn);  // 0 at the first chunk (m = -inf)
      const __m512 e = _mm512_maskz_mov_ps(live, vec::exp(_mm512_sub_ps(s, _mm512_set1_ps(mn))));
      _mm512_store_ps(p[g], e);
      l[g] = l[g] * corr + _mm512_reduce_add_ps(e);
      m[g] = mn;
      if (corr != 1.0f) {
        const __m512 c = _mm512_set1_ps(corr);
        for (int64_t d = 0; d < DV; ++d)
          _mm512_store_ps(acc[g] + 16 * d, _mm512_mul_ps(_mm512_load_ps(acc[g] + 16 * d), c));
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // values: each row once for all G heads
      for (int64_t d = 0; d < DV; ++d) {
        const __m512 v = vec::load(vp[j] + 16 * d);
        for (int64_t g = 0; g < G; ++g)
          _mm512_store_ps(acc[g] + 16 * d,
                          _mm512_fmadd_ps(_mm512_set1_ps(p[g][j]), v, _mm512_load_ps(acc[g] + 16 * d)));
      }
    }
  }
  T* out = static_cast<T*>(a.out) + (b * a.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(l[g] > 0 ? 1.0f / l[g] : 0.0f);
    for (int64_t d = 0; d < DV; ++d)
      vec::store(out + g * D + 16 * d, _mm512_mul_ps(_mm512_load_ps(acc[g] + 16 * d), inv));
  }
}


void decode_attention(const AttentionArgs& a, int64_t task0, int64_t task1) {
  for (int64_t t = task0; t < task1; ++t) {
    if (a.bf16)
      one<uint16_t>(a, t / a.Hkv, t % a.Hkv);
    else
      one<float>(a, t / a.Hkv, t % a.Hkv);
  }
}

}  // namespace

const DecodeAttention decode_attention_avx512 = decode_attention;

}  // namespace ir
