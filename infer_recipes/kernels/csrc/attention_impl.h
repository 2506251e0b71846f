// Decode attention over the paged KV pool, read in place (attention.h), written once over a vector type V (Vec16
// or Vec8) and included, after its instruction set's pragma and vector header, by attention_avx512.cpp and
// attention_avx2.cpp. One query per sequence; the query heads that share a K/V head go together, so each key and
// value row is read once per step; one pass with an online softmax over chunks of V::N keys. An int8 pool's rows
// are read as they are (a quarter of float32's bytes): a key's scores and a value's weights carry its row's scale.
#pragma once
#include <cmath>
#include <type_traits>

#include "attention.h"

namespace ir {
namespace {

constexpr int MAX_G = 16, MAX_D = 256;  // query heads per K/V head and head_dim at most (ops.cpp checks)

// T: q and out (float or bfloat16 bits); C: the caches (T, or int8_t with a.k_scale / a.v_scale)
template <typename V, typename T, typename C>
void one(const AttentionArgs& a, int64_t b, int64_t h) {
  using F = typename V::F;
  constexpr int L = V::N;
  const int64_t G = a.H / a.Hkv, D = a.D, len = a.lens[b];
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + h * G * D;
  const C* kc = static_cast<const C*>(a.k_cache);
  const C* vc = static_cast<const C*>(a.v_cache);
  const int64_t* table = a.blocks + b * a.blocks_per_row;
  alignas(64) float qf[MAX_G][MAX_D], acc[MAX_G][MAX_D], sc[MAX_G][L], p[MAX_G][L];
  float m[MAX_G], l[MAX_G];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += L) {
      V::store(qf[g] + d, V::mul(V::load(q + g * D + d), V::set1(a.scale)));
      V::store(acc[g] + d, V::zero());
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  const C* kp[L];
  const C* vp[L];
  float ks[L], vs[L];  // the rows' scales (1 for a float pool)
  for (int64_t c0 = 0; c0 < len; c0 += L) {
    const int64_t n = len - c0 < L ? len - c0 : L;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = c0 + j, block = table[pos / a.block_size];
      const int64_t row = (block * a.Hkv + h) * a.block_size + pos % a.block_size;
      kp[j] = kc + row * D;
      vp[j] = vc + row * D;
      ks[j] = a.k_scale ? a.k_scale[row] : 1.0f;
      vs[j] = a.v_scale ? a.v_scale[row] : 1.0f;
    }
    for (int64_t j = 0; j < n; ++j) {  // scores: each key row once for all G heads
      F s[MAX_G];
      for (int64_t g = 0; g < G; ++g) s[g] = V::zero();
      for (int64_t d = 0; d < D; d += L) {
        const F k = V::load(kp[j] + d);
        for (int64_t g = 0; g < G; ++g) s[g] = V::fmadd(V::load(qf[g] + d), k, s[g]);
      }
      for (int64_t g = 0; g < G; ++g) sc[g][j] = V::hsum(s[g]) * ks[j];
    }
    for (int64_t g = 0; g < G; ++g) {
      const F s = V::load_first(sc[g], n, -INFINITY);  // lanes past the last key: -inf for the max
      const float mb = V::hmax(s);
      const float mn = mb > m[g] ? mb : m[g];
      const float corr = std::exp(m[g] - mn);  // 0 at the first chunk (m = -inf)
      const F e = V::keep_first(V::exp(V::sub(s, V::set1(mn))), n);  // and 0 after the exponential
      V::store(p[g], e);
      l[g] = l[g] * corr + V::hsum(e);
      m[g] = mn;
      if (corr != 1.0f) {
        const F c = V::set1(corr);
        for (int64_t d = 0; d < D; d += L) V::store(acc[g] + d, V::mul(V::load(acc[g] + d), c));
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // values: each row once for all G heads
      for (int64_t d = 0; d < D; d += L) {
        const F v = V::load(vp[j] + d);
        for (int64_t g = 0; g < G; ++g)
          V::store(acc[g] + d, V::fmadd(V::set1(p[g][j] * vs[j]), v, V::load(acc[g] + d)));
      }
    }
  }
  T* out = static_cast<T*>(a.out) + (b * a.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const F inv = V::set1(l[g] > 0 ? 1.0f / l[g] : 0.0f);
    for (int64_t d = 0; d < D; d += L) V::store(out + g * D + d, V::mul(V::load(acc[g] + d), inv));
  }
}

// tasks [task0, task1) of (sequence, K/V head); caches in q's dtype, or (INT8) int8 with their scales
template <typename V, bool INT8>
void decode_attention(const AttentionArgs& a, int64_t task0, int64_t task1) {
  for (int64_t t = task0; t < task1; ++t) {
    if (a.bf16)
      one<V, uint16_t, std::conditional_t<INT8, int8_t, uint16_t>>(a, t / a.Hkv, t % a.Hkv);
    else
      one<V, float, std::conditional_t<INT8, int8_t, float>>(a, t / a.Hkv, t % a.Hkv);
  }
}

}  // namespace
}  // namespace ir
