// Decode attention over the paged KV pool, read in place (attention.h), written once over a vector type V (Vec16
// or Vec8) and included, after its instruction set's pragma and vector header, by attention_avx512.cpp and
// attention_avx2.cpp. One query per sequence; the query heads that share a K/V head go together, so each key and
// value row is read once per step; one pass with an online softmax over chunks of V::N keys. An int8 pool's rows
// are read as they are (a quarter of float32's bytes): a key's scores and a value's weights carry its row's scale.
//
// The query heads of a group are handled up to GB at a time with their sums in registers (`scores`, `values`,
// instantiated per count), not in memory: with a count known only at run time the compiler kept them on the stack
// and every multiply-add loaded and stored its sum. Scores go four keys at a time, their sums reduced together
// (V::hsum4: a third of the shuffles of one reduction per key); values four vectors of a row at a time, so each
// weight is broadcast once for them. A sequence's keys may be split into ranges read by different
// threads (split-K, attention.h), whose states `combine` merges.
#pragma once
#include <cmath>
#include <type_traits>

#include "attention.h"

namespace ir {
namespace {

constexpr int MAX_G = 16, MAX_D = 256;  // query heads per K/V head and head_dim at most (ops.cpp checks)
constexpr int GB = 4;                   // query heads whose sums are held in registers at once (4 vectors each)

// the softmax state of one (sequence, K/V head) over the keys read so far, per query head of the group: the
// largest score m, the sum of exp(score - m) l, the exp-weighted sum of the value rows acc
struct State {
  float m[MAX_G], l[MAX_G];
  alignas(64) float acc[MAX_G][MAX_D];
};

// sc[i][j] = q_i . k_j * ks[j] for NG query heads and the n (<= V::N) key rows kp
template <typename V, int NG, typename C>
inline void scores(const float (*qf)[MAX_D], const C* const* kp, const float* ks, int64_t n, int64_t D,
                   float (*sc)[V::N]) {
  using F = typename V::F;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at a time, their sums reduced together
    F s[NG][4];
    for (int i = 0; i < NG; ++i)
      for (int r = 0; r < 4; ++r) s[i][r] = V::zero();
    for (int64_t d = 0; d < D; d += V::N) {
      for (int r = 0; r < 4; ++r) {
        const F k = V::load(kp[j + r] + d);
        for (int i = 0; i < NG; ++i) s[i][r] = V::fmadd(V::load(qf[i] + d), k, s[i][r]);
      }
    }
    const __m128 scale = _mm_loadu_ps(ks + j);
    for (int i = 0; i < NG; ++i)
      _mm_storeu_ps(sc[i] + j, _mm_mul_ps(V::hsum4(s[i][0], s[i][1], s[i][2], s[i][3]), scale));
  }
  for (; j < n; ++j) {
    F s[NG];
    for (int i = 0; i < NG; ++i) s[i] = V::zero();
    for (int64_t d = 0; d < D; d += V::N) {
      const F k = V::load(kp[j] + d);
      for (int i = 0; i < NG; ++i) s[i] = V::fmadd(V::load(qf[i] + d), k, s[i]);
    }
    for (int i = 0; i < NG; ++i) sc[i][j] = V::hsum(s[i]) * ks[j];
  }
}

// acc[i] += sum_j pv[i][j] v_j for NG query heads and the n value rows vp
template <typename V, int NG, typename C>
inline void values(float (*acc)[MAX_D], const float (*pv)[V::N], const C* const* vp, int64_t n, int64_t D) {
  using F = typename V::F;
  constexpr int DB = 4;  // vectors of a row at a time: NG x DB sums in registers, each weight broadcast once for DB
  int64_t d = 0;
  for (; d + DB * V::N <= D; d += DB * V::N) {
    F r[NG][DB];
    for (int i = 0; i < NG; ++i)
      for (int c = 0; c < DB; ++c) r[i][c] = V::load(acc[i] + d + c * V::N);
    for (int64_t j = 0; j < n; ++j) {
      F v[DB];
      for (int c = 0; c < DB; ++c) v[c] = V::load(vp[j] + d + c * V::N);
      for (int i = 0; i < NG; ++i) {
        const F w = V::set1(pv[i][j]);
        for (int c = 0; c < DB; ++c) r[i][c] = V::fmadd(w, v[c], r[i][c]);
      }
    }
    for (int i = 0; i < NG; ++i)
      for (int c = 0; c < DB; ++c) V::store(acc[i] + d + c * V::N, r[i][c]);
  }
  for (; d < D; d += V::N) {
    F r[NG];
    for (int i = 0; i < NG; ++i) r[i] = V::load(acc[i] + d);
    for (int64_t j = 0; j < n; ++j) {
      const F v = V::load(vp[j] + d);
      for (int i = 0; i < NG; ++i) r[i] = V::fmadd(V::set1(pv[i][j]), v, r[i]);
    }
    for (int i = 0; i < NG; ++i) V::store(acc[i] + d, r[i]);
  }
}

// the query heads [g0, g0 + ng) of a group through the instantiation for their count
template <typename V, typename C>
inline void scores_n(int64_t ng, const float (*qf)[MAX_D], const C* const* kp, const float* ks, int64_t n,
                     int64_t D, float (*sc)[V::N]) {
  switch (ng) {
    case 1: return scores<V, 1>(qf, kp, ks, n, D, sc);
    case 2: return scores<V, 2>(qf, kp, ks, n, D, sc);
    case 3: return scores<V, 3>(qf, kp, ks, n, D, sc);
    default: return scores<V, GB>(qf, kp, ks, n, D, sc);
  }
}

template <typename V, typename C>
inline void values_n(int64_t ng, float (*acc)[MAX_D], const float (*pv)[V::N], const C* const* vp, int64_t n,
                     int64_t D) {
  switch (ng) {
    case 1: return values<V, 1>(acc, pv, vp, n, D);
    case 2: return values<V, 2>(acc, pv, vp, n, D);
    case 3: return values<V, 3>(acc, pv, vp, n, D);
    default: return values<V, GB>(acc, pv, vp, n, D);
  }
}

// keys [p0, p1) of sequence b against K/V head h into st (T: q's dtype; C: the caches', T or int8_t)
template <typename V, typename T, typename C>
void attend(const AttentionArgs& a, int64_t b, int64_t h, int64_t p0, int64_t p1, State& st) {
  using F = typename V::F;
  constexpr int L = V::N;
  const int64_t G = a.H / a.Hkv, D = a.D;
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride + h * G * D;
  const C* kc = static_cast<const C*>(a.k_cache);
  const C* vc = static_cast<const C*>(a.v_cache);
  const int64_t* table = a.blocks + b * a.blocks_per_row;
  alignas(64) float qf[MAX_G][MAX_D], sc[MAX_G][L], pv[MAX_G][L];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += L) {
      V::store(qf[g] + d, V::mul(V::load(q + g * D + d), V::set1(a.scale)));
      V::store(st.acc[g] + d, V::zero());
    }
    st.m[g] = -INFINITY;
    st.l[g] = 0.0f;
  }
  const C* kp[L];
  const C* vp[L];
  alignas(64) float ks[L], vs[L];  // the rows' scales (1 for a float pool, and past the last row of a chunk)
  for (int j = 0; j < L; ++j) ks[j] = vs[j] = 1.0f;
  int64_t blk = p0 / a.block_size, off = p0 % a.block_size;  // where the next key lies: no division per key
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(C));
  for (int64_t c0 = p0; c0 < p1; c0 += L) {
    const int64_t n = p1 - c0 < L ? p1 - c0 : L;
    // the next chunk's rows asked for now, into L2: a block's rows for one head are a few KB, and the hardware
    // prefetcher stops at each (cold from memory, as in a decode step that streamed the weights before, this reads
    // K and V as fast as torch's own sum over the same blocks)
    for (int64_t j = 0, b2 = blk, o2 = off + n; j < L && c0 + n + j < p1; ++j, ++o2) {
      if (o2 >= a.block_size) {
        b2 += o2 / a.block_size;
        o2 %= a.block_size;
      }
      const int64_t row = (table[b2] * a.Hkv + h) * a.block_size + o2;
      for (int64_t byte = 0; byte < row_bytes; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(kc + row * D) + byte, 0, 1);
        __builtin_prefetch(reinterpret_cast<const char*>(vc + row * D) + byte, 0, 1);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = (table[blk] * a.Hkv + h) * a.block_size + off;
      kp[j] = kc + row * D;
      vp[j] = vc + row * D;
      if (a.k_scale) {
        ks[j] = a.k_scale[row];
        vs[j] = a.v_scale[row];
      }
      if (++off == a.block_size) {
        off = 0;
        ++blk;
      }
    }
    for (int64_t g0 = 0; g0 < G; g0 += GB) scores_n<V>(G - g0 < GB ? G - g0 : GB, qf + g0, kp, ks, n, D, sc + g0);
    for (int64_t g = 0; g < G; ++g) {
      const F s = V::load_first(sc[g], n, -INFINITY);  // lanes past the last key: -inf for the max
      const float mb = V::hmax(s);
      const float mn = mb > st.m[g] ? mb : st.m[g];
      const float corr = std::exp(st.m[g] - mn);  // 0 at the first chunk (m = -inf)
      const F e = V::keep_first(V::exp(V::sub(s, V::set1(mn))), n);  // and 0 after the exponential
      V::store(pv[g], V::mul(e, V::load(vs)));  // a value row's weight carries its scale
      st.l[g] = st.l[g] * corr + V::hsum(e);
      st.m[g] = mn;
      if (corr != 1.0f) {
        const F c = V::set1(corr);
        for (int64_t d = 0; d < D; d += L) V::store(st.acc[g] + d, V::mul(V::load(st.acc[g] + d), c));
      }
    }
    for (int64_t g0 = 0; g0 < G; g0 += GB) values_n<V>(G - g0 < GB ? G - g0 : GB, st.acc + g0, pv + g0, vp, n, D);
  }
}

// out[b, h's query heads] = acc / l (0 for a sequence without keys)
template <typename V, typename T>
void finish(const AttentionArgs& a, int64_t b, int64_t h, const State& st) {
  const int64_t G = a.H / a.Hkv, D = a.D;
  T* out = static_cast<T*>(a.out) + (b * a.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const typename V::F inv = V::set1(st.l[g] > 0 ? 1.0f / st.l[g] : 0.0f);
    for (int64_t d = 0; d < D; d += V::N) V::store(out + g * D + d, V::mul(V::load(st.acc[g] + d), inv));
  }
}

// the states of (b, h)'s key ranges in a.partial merged into one: each range's sums rescaled to the largest max
template <typename V>
void merge(const AttentionArgs& a, int64_t b, int64_t h, State& st) {
  using F = typename V::F;
  const int64_t G = a.H / a.Hkv, D = a.D, S = a.splits, size = partial_floats(G, D);
  const float* first = a.partial + (b * a.Hkv + h) * S * size;
  for (int64_t g = 0; g < G; ++g) {
    float m = -INFINITY;
    for (int64_t s = 0; s < S; ++s) m = first[s * size + g] > m ? first[s * size + g] : m;
    st.m[g] = m;
    st.l[g] = 0.0f;
    for (int64_t d = 0; d < D; d += V::N) V::store(st.acc[g] + d, V::zero());
    if (m == -INFINITY) continue;  // no keys at all
    for (int64_t s = 0; s < S; ++s) {
      const float* part = first + s * size;
      if (part[G + g] == 0.0f) continue;  // an empty range
      const float w = std::exp(part[g] - m);
      st.l[g] += part[G + g] * w;
      const float* acc = part + 2 * G + g * D;
      for (int64_t d = 0; d < D; d += V::N)
        V::store(st.acc[g] + d, V::fmadd(V::load(acc + d), V::set1(w), V::load(st.acc[g] + d)));
    }
  }
}

template <typename V, typename T, typename C>
void run(const AttentionArgs& a, int64_t task0, int64_t task1) {
  State st;
  if (a.combine) {
    for (int64_t t = task0; t < task1; ++t) {
      merge<V>(a, t / a.Hkv, t % a.Hkv, st);
      finish<V, T>(a, t / a.Hkv, t % a.Hkv, st);
    }
    return;
  }
  const int64_t S = a.splits, G = a.H / a.Hkv, D = a.D;
  for (int64_t t = task0; t < task1; ++t) {
    const int64_t b = t / (a.Hkv * S), h = t / S % a.Hkv, s = t % S, len = a.lens[b];
    const int64_t per = ((len + S - 1) / S + V::N - 1) / V::N * V::N;  // whole chunks per range
    const int64_t p0 = s * per < len ? s * per : len, p1 = p0 + per < len ? p0 + per : len;
    attend<V, T, C>(a, b, h, p0, p1, st);
    if (S == 1) {
      finish<V, T>(a, b, h, st);
      continue;
    }
    float* part = a.partial + t * partial_floats(G, D);
    for (int64_t g = 0; g < G; ++g) {
      part[g] = st.m[g];
      part[G + g] = st.l[g];
      for (int64_t d = 0; d < D; d += V::N) V::store(part + 2 * G + g * D + d, V::load(st.acc[g] + d));
    }
  }
}

// tasks [task0, task1) (attention.h); caches in q's dtype, or (INT8) int8 with their scales
template <typename V, bool INT8>
void decode_attention(const AttentionArgs& a, int64_t task0, int64_t task1) {
  if (a.bf16)
    run<V, uint16_t, std::conditional_t<INT8, int8_t, uint16_t>>(a, task0, task1);
  else
    run<V, float, std::conditional_t<INT8, int8_t, float>>(a, task0, task1);
}

}  // namespace
}  // namespace ir
