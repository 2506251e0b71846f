// Paged decode attention (attention_avx512.cpp, attention_avx2.cpp): raw pointers, no torch.
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
  bool bf16;  // q, caches and out are bfloat16 (else float32)
};

// tasks are (sequence, K/V head) pairs, sequence-major; one function per instruction set
using DecodeAttention = void (*)(const AttentionArgs& a, int64_t task0, int64_t task1);
extern const DecodeAttention decode_attention_avx512, decode_attention_avx2;

}  // namespace ir
