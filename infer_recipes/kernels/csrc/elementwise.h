// The small fused operations of a decode step (elementwise_avx512.cpp, elementwise_avx2.cpp): raw pointers, no
// torch. `bf16`: the tensors are bfloat16 (else float32); math is float32 throughout.
#pragma once
#include <cstdint>

namespace ir {

struct Elementwise {
  // rows [r0, r1) of: sum = x + residual (when residual is given, else x), y = sum / rms(sum) * weight
  void (*rms_norm)(const void* x, const void* residual, const float* weight, float eps, int64_t H, bool bf16,
                   void* y, void* sum, int64_t r0, int64_t r1);
  // tokens [t0, t1) of a fused qkv output [N, (H + 2 Hkv) D] (rows `stride` apart): q and k rotated in place
  // (the half-rotation convention, cos/sin [N, D] in the same dtype), then k and v copied to their pool slots
  // (caches [blocks, Hkv, block_size, D]).
  void (*rope_cache)(void* qkv, int64_t stride, const void* cos, const void* sin, int64_t H, int64_t Hkv, int64_t D,
                     void* k_cache, void* v_cache, const int64_t* slots, int64_t block_size, bool bf16, int64_t t0,
                     int64_t t1);
  // tokens [t0, t1) of a fused qkv output (rotated): k and v into an int8 pool (caches [blocks, Hkv, block_size, D]
  // int8, scales [blocks, Hkv, block_size] float32), each row (token, head) over its absolute maximum / 127,
  // rounded half to even, as quantize_kv in layers/attention.py does
  void (*store_int8)(const void* qkv, int64_t stride, int64_t H, int64_t Hkv, int64_t D, int8_t* k_cache,
                     int8_t* v_cache, float* k_scale, float* v_scale, const int64_t* slots, int64_t block_size,
                     bool bf16, int64_t t0, int64_t t1);
  // rows [r0, r1) of silu(gate) * up, gate_up [N, 2 I] -> y [N, I]
  void (*silu_mul)(const void* gate_up, int64_t I, bool bf16, void* y, int64_t r0, int64_t r1);
};

extern const Elementwise elementwise_avx512, elementwise_avx2;

}  // namespace ir
