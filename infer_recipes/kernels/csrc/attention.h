// Paged decode attention (attention_impl.h, compiled per instruction set): raw pointers, no torch.
#pragma once
#include <cstdint>

namespace ir {

struct AttentionArgs {
  const void* q;        // [B, H, D], rows q_stride elements apart
  const void* k_cache;  // [num_blocks, Hkv, block_size, D]
  const void* v_cache;
  const int64_t* blocks;  // [B, blocks_per_row]
  const int64_t* lens;    // [B] keys per sequence
  void* out;              // [B, H, D]
  int64_t q_stride, blocks_per_row, H, Hkv, block_size, D;
  float scale;
  bool bf16;  // q and out are bfloat16 (else float32), and so are the caches unless they are int8
  // an int8 pool: a float32 scale per token and K/V head beside the caches, [num_blocks, Hkv, block_size]
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

// tasks are (sequence, K/V head) pairs, sequence-major; per instruction set one function for a pool in q's dtype
// and one for an int8 pool
using DecodeAttention = void (*)(const AttentionArgs& a, int64_t task0, int64_t task1);
extern const DecodeAttention decode_attention_avx512, decode_attention_avx2;
extern const DecodeAttention decode_attention_int8_avx512, decode_attention_int8_avx2;

}  // namespace ir
