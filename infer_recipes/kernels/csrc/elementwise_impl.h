// The small fused operations of elementwise.h, written once over a vector type V (Vec16 or Vec8): included, after
// its instruction set's pragma and vector header, by elementwise_avx512.cpp and elementwise_avx2.cpp, which each
// compile it for their set. Rows are whole multiples of V::N lanes (ops.cpp checks).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>

#include "elementwise.h"

namespace ir {
namespace {

template <typename V, typename T>
void rms_norm_t(const T* x, const T* res, const float* w, float eps, int64_t H, T* y, T* sum, int64_t r0,
                int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    T* sr = sum + r * H;
    typename V::F ss = V::zero();
    for (int64_t i = 0; i < H; i += V::N) {
      typename V::F v = V::load(xr + i);
      if (res) v = V::add(v, V::load(res + r * H + i));
      V::store(sr + i, v);
      ss = V::fmadd(v, v, ss);
    }
    // the reference normalizes the sum as stored (in bfloat16, rounded), so read it back
    const typename V::F inv = V::set1(1.0f / std::sqrt(V::hsum(ss) / H + eps));
    for (int64_t i = 0; i < H; i += V::N) {
      T tmp[V::N];
      V::store(tmp, V::mul(V::load(sr + i), inv));  // the reference rounds the normalized value to the dtype
      V::store(y + r * H + i, V::mul(V::load(tmp), V::load(w + i)));
    }
  }
}

template <typename V, typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += V::N) {  // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    const typename V::F a = V::load(x + i), b = V::load(x + half + i);
    V::store(x + i, V::fmsub(a, V::load(cos + i), V::mul(b, V::load(sin + i))));
    V::store(x + half + i, V::fmadd(b, V::load(cos + half + i), V::mul(a, V::load(sin + half + i))));
  }
}

template <typename V, typename T>
void rope_cache_t(T* qkv, int64_t stride, const T* cos, const T* sin, int64_t H, int64_t Hkv, int64_t D,
                  T* kc, T* vc, const int64_t* slots, int64_t bs, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    T* row = qkv + t * stride;
    for (int64_t h = 0; h < H + Hkv; ++h) rotate<V>(row + h * D, cos + t * D, sin + t * D, D);
    if (!slots) continue;
    const int64_t block = slots[t] / bs, off = slots[t] % bs;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = ((block * Hkv + h) * bs + off) * D;
      std::memcpy(kc + at, row + (H + h) * D, D * sizeof(T));
      std::memcpy(vc + at, row + (H + Hkv + h) * D, D * sizeof(T));
    }
  }
}

template <typename V, typename T>
void store_int8_t(const T* qkv, int64_t stride, int64_t H, int64_t Hkv, int64_t D, int8_t* kc, int8_t* vc,
                  float* ks, float* vs, const int64_t* slots, int64_t bs, int64_t t0, int64_t t1) {
  const typename V::F lo = V::set1(-127.0f), hi = V::set1(127.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t block = slots[t] / bs, off = slots[t] % bs;
    for (int64_t h = 0; h < 2 * Hkv; ++h) {
      const T* src = qkv + t * stride + (H + h) * D;
      const bool key = h < Hkv;
      const int64_t row = (block * Hkv + (key ? h : h - Hkv)) * bs + off;
      typename V::F amax = V::zero();
      for (int64_t d = 0; d < D; d += V::N) amax = V::max(amax, V::abs(V::load(src + d)));
      const float scale = std::max(V::hmax(amax), 1e-12f) / 127.0f;
      const typename V::F s = V::set1(scale);
      int8_t* dst = (key ? kc : vc) + row * D;
      for (int64_t d = 0; d < D; d += V::N)  // a division, as the reference does: x * (1 / s) rounds differently
        V::store_i8(dst + d, V::round(V::min(hi, V::max(lo, V::div(V::load(src + d), s)))));
      (key ? ks : vs)[row] = scale;
    }
  }
}

template <typename V, typename T>
void silu_mul_t(const T* gu, int64_t I, T* y, int64_t r0, int64_t r1) {
  const typename V::F one = V::set1(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = 0; i < I; i += V::N) {
      const typename V::F g = V::load(gu + r * 2 * I + i), u = V::load(gu + r * 2 * I + I + i);
      const typename V::F s = V::div(g, V::add(one, V::exp(V::sub(V::zero(), g))));
      T tmp[V::N];
      V::store(tmp, s);  // the reference rounds silu(gate) to the dtype before the product
      V::store(y + r * I + i, V::mul(V::load(tmp), u));
    }
  }
}

template <typename V>
void rms_norm(const void* x, const void* residual, const float* weight, float eps, int64_t H, bool bf16, void* y,
              void* sum, int64_t r0, int64_t r1) {
  if (bf16)
    rms_norm_t<V>(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(residual), weight, eps, H,
                  static_cast<uint16_t*>(y), static_cast<uint16_t*>(sum), r0, r1);
  else
    rms_norm_t<V>(static_cast<const float*>(x), static_cast<const float*>(residual), weight, eps, H,
                  static_cast<float*>(y), static_cast<float*>(sum), r0, r1);
}

template <typename V>
void rope_cache(void* qkv, int64_t stride, const void* cos, const void* sin, int64_t H, int64_t Hkv, int64_t D,
                void* k_cache, void* v_cache, const int64_t* slots, int64_t block_size, bool bf16, int64_t t0,
                int64_t t1) {
  if (bf16)
    rope_cache_t<V>(static_cast<uint16_t*>(qkv), stride, static_cast<const uint16_t*>(cos),
                    static_cast<const uint16_t*>(sin), H, Hkv, D, static_cast<uint16_t*>(k_cache),
                    static_cast<uint16_t*>(v_cache), slots, block_size, t0, t1);
  else
    rope_cache_t<V>(static_cast<float*>(qkv), stride, static_cast<const float*>(cos),
                    static_cast<const float*>(sin), H, Hkv, D, static_cast<float*>(k_cache),
                    static_cast<float*>(v_cache), slots, block_size, t0, t1);
}

template <typename V>
void store_int8(const void* qkv, int64_t stride, int64_t H, int64_t Hkv, int64_t D, int8_t* k_cache, int8_t* v_cache,
                float* k_scale, float* v_scale, const int64_t* slots, int64_t block_size, bool bf16, int64_t t0,
                int64_t t1) {
  if (bf16)
    store_int8_t<V>(static_cast<const uint16_t*>(qkv), stride, H, Hkv, D, k_cache, v_cache, k_scale, v_scale, slots,
                    block_size, t0, t1);
  else
    store_int8_t<V>(static_cast<const float*>(qkv), stride, H, Hkv, D, k_cache, v_cache, k_scale, v_scale, slots,
                    block_size, t0, t1);
}

template <typename V>
void silu_mul(const void* gate_up, int64_t I, bool bf16, void* y, int64_t r0, int64_t r1) {
  if (bf16)
    silu_mul_t<V>(static_cast<const uint16_t*>(gate_up), I, static_cast<uint16_t*>(y), r0, r1);
  else
    silu_mul_t<V>(static_cast<const float*>(gate_up), I, static_cast<float*>(y), r0, r1);
}

}  // namespace

// the table of one instruction set: `const Elementwise elementwise_avx2 = elementwise_table<Vec8>;`
template <typename V>
constexpr Elementwise elementwise_table = {rms_norm<V>, rope_cache<V>, store_int8<V>, silu_mul<V>};

}  // namespace ir
