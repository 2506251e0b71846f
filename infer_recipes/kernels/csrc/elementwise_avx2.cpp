// RMSNorm with the residual add, rotary embedding with the K/V cache write, SiLU-and-multiply on AVX2:
// elementwise_avx512.cpp's passes, with its rounding to the dtype at the same points, in 8-lane vectors.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "elementwise.h"
#include "vec8.h"

namespace ir {
namespace {

template <typename T>
void rms_norm_t(const T* x, const T* res, const float* w, float eps, int64_t H, T* y, T* sum, int64_t r0,
                int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    T* sr = sum + r * H;
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < H; i += 8) {
      __m256 v = vec8::load(xr + i);
      if (res) v = _mm256_add_ps(v, vec8::load(res + r * H + i));
      vec8::store(sr + i, v);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    // the reference normalizes the sum as stored (in bfloat16, rounded), so read it back
    const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(vec8::hsum(ss) / H + eps));
    for (int64_t i = 0; i < H; i += 8) {
      T tmp[8];
      vec8::store(tmp, _mm256_mul_ps(vec8::load(sr + i), inv));  // the reference rounds the normalized value
      vec8::store(y + r * H + i, _mm256_mul_ps(vec8::load(tmp), _mm256_loadu_ps(w + i)));
    }
  }
}

template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += 8) {  // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    const __m256 a = vec8::load(x + i), b = vec8::load(x + half + i);
    vec8::store(x + i, _mm256_fmsub_ps(a, vec8::load(cos + i), _mm256_mul_ps(b, vec8::load(sin + i))));
    vec8::store(x + half + i,
                _mm256_fmadd_ps(b, vec8::load(cos + half + i), _mm256_mul_ps(a, vec8::load(sin + half + i))));
  }
}

template <typename T>
void rope_cache_t(T* qkv, int64_t stride, const T* cos, const T* sin, int64_t H, int64_t Hkv, int64_t D,
                  T* kc, T* vc, const int64_t* slots, int64_t bs, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    T* row = qkv + t * stride;
    for (int64_t h = 0; h < H + Hkv; ++h) rotate(row + h * D, cos + t * D, sin + t * D, D);
    if (!slots) continue;
    const int64_t block = slots[t] / bs, off = slots[t] % bs;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = ((block * Hkv + h) * bs + off) * D;
      std::memcpy(kc + at, row + (H + h) * D, D * sizeof(T));
      std::memcpy(vc + at, row + (H + Hkv + h) * D, D * sizeof(T));
    }
  }
}

template <typename T>
void silu_mul_t(const T* gu, int64_t I, T* y, int64_t r0, int64_t r1) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = 0; i < I; i += 8) {
      const __m256 g = vec8::load(gu + r * 2 * I + i), u = vec8::load(gu + r * 2 * I + I + i);
      const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, vec8::exp(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      T tmp[8];
      vec8::store(tmp, s);  // the reference rounds silu(gate) to the dtype before the product
      vec8::store(y + r * I + i, _mm256_mul_ps(vec8::load(tmp), u));
    }
  }
}

void rms_norm(const void* x, const void* residual, const float* weight, float eps, int64_t H, bool bf16, void* y,
              void* sum, int64_t r0, int64_t r1) {
  if (bf16)
    rms_norm_t(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(residual), weight, eps, H,
               static_cast<uint16_t*>(y), static_cast<uint16_t*>(sum), r0, r1);
  else
    rms_norm_t(static_cast<const float*>(x), static_cast<const float*>(residual), weight, eps, H,
               static_cast<float*>(y), static_cast<float*>(sum), r0, r1);
}

void rope_cache(void* qkv, int64_t stride, const void* cos, const void* sin, int64_t H, int64_t Hkv, int64_t D,
                void* k_cache, void* v_cache, const int64_t* slots, int64_t block_size, bool bf16, int64_t t0,
                int64_t t1) {
  if (bf16)
    rope_cache_t(static_cast<uint16_t*>(qkv), stride, static_cast<const uint16_t*>(cos),
                 static_cast<const uint16_t*>(sin), H, Hkv, D, static_cast<uint16_t*>(k_cache),
                 static_cast<uint16_t*>(v_cache), slots, block_size, t0, t1);
  else
    rope_cache_t(static_cast<float*>(qkv), stride, static_cast<const float*>(cos), static_cast<const float*>(sin),
                 H, Hkv, D, static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, block_size, t0, t1);
}

void silu_mul(const void* gate_up, int64_t I, bool bf16, void* y, int64_t r0, int64_t r1) {
  if (bf16)
    silu_mul_t(static_cast<const uint16_t*>(gate_up), I, static_cast<uint16_t*>(y), r0, r1);
  else
    silu_mul_t(static_cast<const float*>(gate_up), I, static_cast<float*>(y), r0, r1);
}

}  // namespace

const Elementwise elementwise_avx2 = {rms_norm, rope_cache, silu_mul};

}  // namespace ir
