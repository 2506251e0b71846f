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
//
// attention_avx512bf16.cpp compiles it once more with IR_BF16_DOT for CPUs with AVX512-BF16: there a bfloat16
// pool's scores take q and the keys as bfloat16 pairs (exact products, float32 sums) and its values' weights are
// rounded to bfloat16 and two keys' rows interleaved, so one instruction adds 32 products and no row is widened
// to float32 first (scores_bf16, values_bf16). The rounded weights move an output by about one bfloat16 step, the
// precision a bfloat16 model's output has anyway.
//
// attention_avx512.cpp compiles it with IR_VNNI_DOT (AVX512-VNNI, on every CPU our AVX-512 kernels run on): there
// an int8 pool read by a bfloat16 query takes integer dot products, 64 products an instruction, instead of widening
// every key and value to float32 (which left the int8 pool no faster than a bfloat16 one at batch 16: arithmetic,
// not its halved bytes, set its time). Scores: q in two int8 levels (q / s = hi + lo / 254, s = max|q| / 127: 14
// bits, finer than q's own bfloat16), sixteen keys' rows transposed so each lane is one key (scores_vnni). Values:
// the chunk's weights as 16-bit fractions of their largest, in two bytes, four keys' rows interleaved so each lane
// is one element (values_vnni). A float32 query keeps the float32 path (exact to float32 rounding).
#pragma once
#include <cmath>
#include <cstring>
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

#ifdef IR_BF16_DOT
// scores() for a bfloat16 pool on a CPU with AVX512-BF16: sc[i][j] = (q_i . k_j) * scale with q_i in bfloat16 as it
// came, 32 products a dot-product instruction (each product of two bfloat16 exact in float32, summed in float32),
// so neither the keys nor q are widened to float32 first. D a multiple of 32.
template <int NG>
inline void scores_bf16(const uint16_t (*qb)[MAX_D], const uint16_t* const* kp, float scale, int64_t n, int64_t D,
                        float (*sc)[16]) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 s[NG][4];
    for (int i = 0; i < NG; ++i)
      for (int r = 0; r < 4; ++r) s[i][r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      for (int r = 0; r < 4; ++r) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(kp[j + r] + d);
        for (int i = 0; i < NG; ++i) s[i][r] = _mm512_dpbf16_ps(s[i][r], (__m512bh)_mm512_loadu_si512(qb[i] + d), k);
      }
    }
    for (int i = 0; i < NG; ++i)
      _mm_storeu_ps(sc[i] + j, _mm_mul_ps(Vec16::hsum4(s[i][0], s[i][1], s[i][2], s[i][3]), _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    __m512 s[NG];
    for (int i = 0; i < NG; ++i) s[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kp[j] + d);
      for (int i = 0; i < NG; ++i) s[i] = _mm512_dpbf16_ps(s[i], (__m512bh)_mm512_loadu_si512(qb[i] + d), k);
    }
    for (int i = 0; i < NG; ++i) sc[i][j] = Vec16::hsum(s[i]) * scale;
  }
}

// values() for a bfloat16 pool with AVX512-BF16: acc[i] += sum_j w[i][j] v_j, the weights rounded to bfloat16
// (pw: the chunk's weights, 16 per head), and two keys' rows interleaved so one dot-product instruction adds both
// keys' products. acc is kept in the order the interleave leaves (per 32 elements: 0-3, 8-11, 16-19, 24-27, then
// 4-7, 12-15, ...); unpermute() restores it once the keys are read. vp has an even count of valid rows (the
// caller repeats the last: its weight is 0). DB blocks of 32 elements a pass, NG x 2 DB sums in registers.
template <int NG, int DB>
inline void values_bf16_pass(float (*acc)[MAX_D], const uint16_t (*pw)[16], const uint16_t* const* vp, int64_t n,
                             int64_t d) {
  __m512 r[NG][2 * DB];
  for (int i = 0; i < NG; ++i)
    for (int c = 0; c < 2 * DB; ++c) r[i][c] = _mm512_loadu_ps(acc[i] + d + 16 * c);
  for (int64_t j = 0; j < n; j += 2) {
    __m512bh v[2 * DB];
    for (int c = 0; c < DB; ++c) {
      const __m512i a = _mm512_loadu_si512(vp[j] + d + 32 * c), b = _mm512_loadu_si512(vp[j + 1] + d + 32 * c);
      v[2 * c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      v[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int i = 0; i < NG; ++i) {
      int32_t pair;
      std::memcpy(&pair, pw[i] + j, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 2 * DB; ++c) r[i][c] = _mm512_dpbf16_ps(r[i][c], w, v[c]);
    }
  }
  for (int i = 0; i < NG; ++i)
    for (int c = 0; c < 2 * DB; ++c) _mm512_storeu_ps(acc[i] + d + 16 * c, r[i][c]);
}

template <int NG>
inline void values_bf16(float (*acc)[MAX_D], const uint16_t (*pw)[16], const uint16_t* const* vp, int64_t n,
                        int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) values_bf16_pass<NG, 2>(acc, pw, vp, n, d);
  if (d < D) values_bf16_pass<NG, 1>(acc, pw, vp, n, d);
}

inline void values_bf16_n(int64_t ng, float (*acc)[MAX_D], const uint16_t (*pw)[16], const uint16_t* const* vp,
                          int64_t n, int64_t D) {
  switch (ng) {
    case 1: return values_bf16<1>(acc, pw, vp, n, D);
    case 2: return values_bf16<2>(acc, pw, vp, n, D);
    case 3: return values_bf16<3>(acc, pw, vp, n, D);
    default: return values_bf16<GB>(acc, pw, vp, n, D);
  }
}

// acc back from values_bf16's order to the elements' own
inline void unpermute(float* acc, int64_t D) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t d = 0; d < D; d += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + d), hi = _mm512_loadu_ps(acc + d + 16);
    _mm512_storeu_ps(acc + d, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + d + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

inline void scores_bf16_n(int64_t ng, const uint16_t (*qb)[MAX_D], const uint16_t* const* kp, float scale, int64_t n,
                          int64_t D, float (*sc)[16]) {
  switch (ng) {
    case 1: return scores_bf16<1>(qb, kp, scale, n, D, sc);
    case 2: return scores_bf16<2>(qb, kp, scale, n, D, sc);
    case 3: return scores_bf16<3>(qb, kp, scale, n, D, sc);
    default: return scores_bf16<GB>(qb, kp, scale, n, D, sc);
  }
}
#endif

#ifdef IR_VNNI_DOT
// t[c] := the c-th 32-bit word of the rows t[0..15] (a 16 x 16 transpose of 32-bit words)
inline void transpose16(__m512i (&t)[16]) {
  __m512i u[16];
  for (int i = 0; i < 16; i += 2) {
    u[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
  }
  // v[4R + k]'s 128-bit lane L: word 4L + k of rows 4R..4R+3
  __m512i v[16];
  for (int R = 0; R < 4; ++R) {
    const __m512i *lo = u + 4 * R, *hi = u + 4 * R + 2;
    v[4 * R] = _mm512_unpacklo_epi64(lo[0], hi[0]);
    v[4 * R + 1] = _mm512_unpackhi_epi64(lo[0], hi[0]);
    v[4 * R + 2] = _mm512_unpacklo_epi64(lo[1], hi[1]);
    v[4 * R + 3] = _mm512_unpackhi_epi64(lo[1], hi[1]);
  }
  for (int k = 0; k < 4; ++k) {  // the 128-bit lanes of v[k], v[4 + k], v[8 + k], v[12 + k] transposed
    const __m512i a = _mm512_shuffle_i32x4(v[k], v[4 + k], 0x44), b = _mm512_shuffle_i32x4(v[k], v[4 + k], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(v[8 + k], v[12 + k], 0x44), d = _mm512_shuffle_i32x4(v[8 + k], v[12 + k], 0xEE);
    t[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// a query head in two int8 levels: q ~ s (hi + lo / 254), with 128 times each level's sum (the unsigned keys' offset)
struct QuantizedQuery {
  alignas(64) int8_t hi[MAX_G][MAX_D], lo[MAX_G][MAX_D];
  float s[MAX_G];  // s / 254
  int32_t hi_sum[MAX_G], lo_sum[MAX_G];
};

inline void quantize_query(const float (*qf)[MAX_D], int64_t G, int64_t D, QuantizedQuery& qq) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(qf[g] + d)));
    const float amax = _mm512_reduce_max_ps(m), s = amax > 0 ? amax / 127 : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    __m512i hs = _mm512_setzero_si512(), ls = _mm512_setzero_si512();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(qf[g] + d), inv);
      const __m512i h = _mm512_cvtps_epi32(x);  // [-127, 127]
      const __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(x, _mm512_cvtepi32_ps(h)), _mm512_set1_ps(254)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qq.hi[g] + d), _mm512_cvtsepi32_epi8(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qq.lo[g] + d), _mm512_cvtsepi32_epi8(l));
      hs = _mm512_add_epi32(hs, h);
      ls = _mm512_add_epi32(ls, l);
    }
    qq.s[g] = s / 254;
    qq.hi_sum[g] = 128 * _mm512_reduce_add_epi32(hs);
    qq.lo_sum[g] = 128 * _mm512_reduce_add_epi32(ls);
  }
}

// scores() for an int8 pool with AVX512-VNNI: sc[i][j] = q_i . k_j * ks[j] for NG query heads (from g0 of qq) and
// the n (<= 16) keys kp, D a multiple of 64. The keys as unsigned bytes (k + 128, exact: the pool holds -127..127),
// sixteen rows transposed so one VNNI instruction adds four products for each of the sixteen keys; the offset
// comes off as 128 times q's sum.
template <int NG>
inline void scores_vnni(const QuantizedQuery& qq, int64_t g0, const int8_t* const* kp, const float* ks, int64_t n,
                        int64_t D, float (*sc)[16]) {
  __m512i ah[NG], al[NG];
  for (int i = 0; i < NG; ++i) ah[i] = al[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512i t[16];
    for (int r = 0; r < 16; ++r)  // rows past the last key: any row (their lanes are dropped after)
      t[r] = _mm512_xor_si512(_mm512_loadu_si512(kp[r < n ? r : n - 1] + d0), flip);
    transpose16(t);
    for (int c = 0; c < 16; ++c)
      for (int i = 0; i < NG; ++i) {
        int32_t h, l;
        std::memcpy(&h, qq.hi[g0 + i] + d0 + 4 * c, 4);
        std::memcpy(&l, qq.lo[g0 + i] + d0 + 4 * c, 4);
        ah[i] = _mm512_dpbusd_epi32(ah[i], t[c], _mm512_set1_epi32(h));
        al[i] = _mm512_dpbusd_epi32(al[i], t[c], _mm512_set1_epi32(l));
      }
  }
  const __m512 scale = _mm512_loadu_ps(ks);
  for (int i = 0; i < NG; ++i) {
    const __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(ah[i], _mm512_set1_epi32(qq.hi_sum[g0 + i])));
    const __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(al[i], _mm512_set1_epi32(qq.lo_sum[g0 + i])));
    const __m512 dot = _mm512_fmadd_ps(h, _mm512_set1_ps(254), l);
    _mm512_storeu_ps(sc[i], _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(qq.s[g0 + i])), scale));
  }
}

inline void scores_vnni_n(int64_t ng, const QuantizedQuery& qq, int64_t g0, const int8_t* const* kp,
                          const float* ks, int64_t n, int64_t D, float (*sc)[16]) {
  switch (ng) {
    case 1: return scores_vnni<1>(qq, g0, kp, ks, n, D, sc);
    case 2: return scores_vnni<2>(qq, g0, kp, ks, n, D, sc);
    case 3: return scores_vnni<3>(qq, g0, kp, ks, n, D, sc);
    default: return scores_vnni<GB>(qq, g0, kp, ks, n, D, sc);
  }
}

// a chunk's value weights (>= 0, 16 a head) as 16-bit fractions of their largest w = ws (hi 256 + lo)
inline void quantize_weights(const float* pv, uint8_t* hi, uint8_t* lo, float& ws) {
  const __m512 w = _mm512_loadu_ps(pv);
  const float wmax = _mm512_reduce_max_ps(w);
  ws = wmax / 65535;
  const __m512i q = wmax > 0 ? _mm512_cvtps_epi32(_mm512_mul_ps(w, _mm512_set1_ps(65535 / wmax)))
                             : _mm512_setzero_si512();
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 8)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(255))));
}

// values() for an int8 pool with AVX512-VNNI: acc[i] += ws_i sum_j (hi_ij 256 + lo_ij) v_j for NG heads, n a
// multiple of 4 (the caller repeats the last row, weight 0). Four rows' bytes interleaved so each 32-bit lane
// holds one element of four keys; acc is kept in the order that leaves (per 64 elements, a 4 x 4 transpose of
// groups of 4), which unpermute_vnni() restores once the keys are read. 16 keys at most: the sums stay in int32.
template <int NG>
inline void values_vnni(float (*acc)[MAX_D], const uint8_t (*hi)[16], const uint8_t (*lo)[16], const float* ws,
                        const int8_t* const* vp, int64_t n, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512i rh[NG][4], rl[NG][4];
    for (int i = 0; i < NG; ++i)
      for (int c = 0; c < 4; ++c) rh[i][c] = rl[i][c] = _mm512_setzero_si512();
    for (int64_t j = 0; j < n; j += 4) {
      const __m512i a0 = _mm512_loadu_si512(vp[j] + d0), a1 = _mm512_loadu_si512(vp[j + 1] + d0);
      const __m512i a2 = _mm512_loadu_si512(vp[j + 2] + d0), a3 = _mm512_loadu_si512(vp[j + 3] + d0);
      const __m512i t0 = _mm512_unpacklo_epi8(a0, a1), t1 = _mm512_unpackhi_epi8(a0, a1);
      const __m512i t2 = _mm512_unpacklo_epi8(a2, a3), t3 = _mm512_unpackhi_epi8(a2, a3);
      const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                            _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
      for (int i = 0; i < NG; ++i) {
        int32_t h, l;
        std::memcpy(&h, hi[i] + j, 4);
        std::memcpy(&l, lo[i] + j, 4);
        const __m512i wh = _mm512_set1_epi32(h), wl = _mm512_set1_epi32(l);
        for (int c = 0; c < 4; ++c) {
          rh[i][c] = _mm512_dpbusd_epi32(rh[i][c], wh, u[c]);
          rl[i][c] = _mm512_dpbusd_epi32(rl[i][c], wl, u[c]);
        }
      }
    }
    for (int i = 0; i < NG; ++i)
      for (int c = 0; c < 4; ++c) {
        const __m512 x = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(rh[i][c], 8), rl[i][c]));
        float* a = acc[i] + d0 + 16 * c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(x, _mm512_set1_ps(ws[i]), _mm512_loadu_ps(a)));
      }
  }
}

inline void values_vnni_n(int64_t ng, float (*acc)[MAX_D], const uint8_t (*hi)[16], const uint8_t (*lo)[16],
                          const float* ws, const int8_t* const* vp, int64_t n, int64_t D) {
  if (ng == 1) return values_vnni<1>(acc, hi, lo, ws, vp, n, D);
  return values_vnni<2>(acc, hi, lo, ws, vp, n, D);
}

// acc back from values_vnni's order: element 16 L + 4 c + m of each 64 lies at 16 c + 4 L + m
inline void unpermute_vnni(float* acc, int64_t D) {
  for (int64_t d = 0; d < D; d += 64) {
    const __m512 s0 = _mm512_loadu_ps(acc + d), s1 = _mm512_loadu_ps(acc + d + 16);
    const __m512 s2 = _mm512_loadu_ps(acc + d + 32), s3 = _mm512_loadu_ps(acc + d + 48);
    const __m512 a = _mm512_shuffle_f32x4(s0, s1, 0x44), b = _mm512_shuffle_f32x4(s0, s1, 0xEE);
    const __m512 c = _mm512_shuffle_f32x4(s2, s3, 0x44), e = _mm512_shuffle_f32x4(s2, s3, 0xEE);
    _mm512_storeu_ps(acc + d, _mm512_shuffle_f32x4(a, c, 0x88));
    _mm512_storeu_ps(acc + d + 16, _mm512_shuffle_f32x4(a, c, 0xDD));
    _mm512_storeu_ps(acc + d + 32, _mm512_shuffle_f32x4(b, e, 0x88));
    _mm512_storeu_ps(acc + d + 48, _mm512_shuffle_f32x4(b, e, 0xDD));
  }
}
#endif

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
#ifdef IR_BF16_DOT
  // a bfloat16 pool with AVX512-BF16 (attention_avx512bf16.cpp): scores and values as bfloat16 dot products, q as
  // it came (the keys' and values' pointers are then to bfloat16)
  constexpr bool pool16 = std::is_same_v<C, uint16_t>;
  const bool dot = pool16 && D % 32 == 0;
  alignas(64) uint16_t qb[pool16 ? MAX_G : 1][MAX_D], pw[pool16 ? MAX_G : 1][L];
  for (int64_t g = 0; dot && g < G; ++g) std::memcpy(qb[g], q + g * D, D * sizeof(uint16_t));
#endif
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += L) {
      V::store(qf[g] + d, V::mul(V::load(q + g * D + d), V::set1(a.scale)));
      V::store(st.acc[g] + d, V::zero());
    }
    st.m[g] = -INFINITY;
    st.l[g] = 0.0f;
  }
#ifdef IR_VNNI_DOT
  // an int8 pool read by a bfloat16 query on a CPU with AVX512-VNNI: integer dot products (scores_vnni,
  // values_vnni)
  constexpr bool pool8 = std::is_same_v<C, int8_t> && std::is_same_v<T, uint16_t>;
  const bool vnni = pool8 && D % 64 == 0;
  QuantizedQuery qq;
  alignas(64) uint8_t wh[pool8 ? MAX_G : 1][16], wl[pool8 ? MAX_G : 1][16];
  float ws[MAX_G];
  if (vnni) quantize_query(qf, G, D, qq);
#endif
  const C* kp[L];
  const C* vp[L];
#ifdef IR_BF16_DOT
  const uint16_t* const* kp16 = reinterpret_cast<const uint16_t* const*>(kp);
  const uint16_t** vp16 = reinterpret_cast<const uint16_t**>(vp);
#endif
  alignas(64) float ks[L], vs[L];  // the rows' scales (1 for a float pool, and past the last row of a chunk)
  for (int j = 0; j < L; ++j) ks[j] = vs[j] = 1.0f;
  const int64_t bs = a.block_size, row_bytes = D * static_cast<int64_t>(sizeof(C));
  // the rows of keys [p, e) for this head, a run at a time: within a block they lie one after another in the pool
  auto runs = [&](int64_t p, int64_t e, auto&& f) {
    for (int64_t b2 = p / bs, o2 = p % bs; p < e; p += bs - o2, ++b2, o2 = 0)
      f((table[b2] * a.Hkv + h) * bs + o2, (e - p < bs - o2 ? e - p : bs - o2));
  };
  for (int64_t c0 = p0; c0 < p1; c0 += L) {
    const int64_t n = p1 - c0 < L ? p1 - c0 : L;
    // the next chunk's rows asked for now, into L2: a block's rows for one head are a few KB, and the hardware
    // prefetcher stops at each (cold from memory, as in a decode step that streamed the weights before, this reads
    // K and V as fast as torch's own sum over the same blocks). An int8 pool's scales first: a line holds a block's,
    // and without them each chunk waited on two lines from memory (a batch-16 call over 512 keys 1.4x slower)
    for (int64_t j = 0, p = c0 + n; j < L && p < p1; ++j, ++p) {
      const int64_t row = (table[p / bs] * a.Hkv + h) * bs + p % bs;
      if (a.k_scale && (j == 0 || p % bs == 0)) {
        __builtin_prefetch(a.k_scale + row, 0, 1);
        __builtin_prefetch(a.v_scale + row, 0, 1);
      }
      for (int64_t byte = 0; byte < row_bytes; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(kc + row * D) + byte, 0, 1);
        __builtin_prefetch(reinterpret_cast<const char*>(vc + row * D) + byte, 0, 1);
      }
    }
    int64_t j = 0;
    runs(c0, c0 + n, [&](int64_t row, int64_t count) {
      for (int64_t r = 0; r < count; ++r, ++j) {
        kp[j] = kc + (row + r) * D;
        vp[j] = vc + (row + r) * D;
        if (a.k_scale) {
          ks[j] = a.k_scale[row + r];
          vs[j] = a.v_scale[row + r];
        }
      }
    });
#ifdef IR_BF16_DOT
    if (dot)
      for (int64_t g0 = 0; g0 < G; g0 += GB)
        scores_bf16_n(G - g0 < GB ? G - g0 : GB, qb + g0, kp16, a.scale, n, D, sc + g0);
    else
#endif
#ifdef IR_VNNI_DOT
    if (vnni)
      for (int64_t g0 = 0; g0 < G; g0 += GB)
        scores_vnni_n(G - g0 < GB ? G - g0 : GB, qq, g0, reinterpret_cast<const int8_t* const*>(kp), ks, n, D,
                      sc + g0);
    else
#endif
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
#ifdef IR_BF16_DOT
    if (dot) {
      for (int64_t g = 0; g < G; ++g)  // the weights in bfloat16 (round to nearest even), 16 a head
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw[g]), (__m256i)_mm512_cvtneps_pbh(V::load(pv[g])));
      if (n % 2) vp16[n] = vp16[n - 1];  // an odd key's pair: any readable row, its weight is 0
      for (int64_t g0 = 0; g0 < G; g0 += GB)
        values_bf16_n(G - g0 < GB ? G - g0 : GB, st.acc + g0, pw + g0, vp16, n, D);
      continue;
    }
#endif
#ifdef IR_VNNI_DOT
    if (vnni) {
      for (int64_t g = 0; g < G; ++g) quantize_weights(pv[g], wh[g], wl[g], ws[g]);
      const int8_t** vp8 = reinterpret_cast<const int8_t**>(vp);
      const int64_t n4 = (n + 3) / 4 * 4;
      for (int64_t j = n; j < n4; ++j) vp8[j] = vp8[n - 1];  // rows to make up four: weight 0
      for (int64_t g0 = 0; g0 < G; g0 += 2)
        values_vnni_n(G - g0 < 2 ? G - g0 : 2, st.acc + g0, wh + g0, wl + g0, ws + g0, vp8, n4, D);
      continue;
    }
#endif
    for (int64_t g0 = 0; g0 < G; g0 += GB) values_n<V>(G - g0 < GB ? G - g0 : GB, st.acc + g0, pv + g0, vp, n, D);
  }
#ifdef IR_BF16_DOT
  if (dot)
    for (int64_t g = 0; g < G; ++g) unpermute(st.acc[g], D);
#endif
#ifdef IR_VNNI_DOT
  if (vnni)
    for (int64_t g = 0; g < G; ++g) unpermute_vnni(st.acc[g], D);
#endif
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
