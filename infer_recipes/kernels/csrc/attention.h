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
  // split-K: each (sequence, K/V head) reads its keys in `splits` consecutive ranges, so a batch with fewer
  // (sequence, head) pairs than threads still keeps every thread busy; each range leaves its running softmax state
  // (`partial_floats` per task) in `partial`, and a second pass (`combine`) merges them into out
  int64_t splits = 1;
  float* partial = nullptr;
  bool combine = false;
};

// floats of one range's state in `partial`: per query head of the group its max score, its sum of exponentials and
// its weighted sum of values (D floats)
inline int64_t partial_floats(int64_t G, int64_t D) { return G * (2 + D); }

// tasks are (sequence, K/V head, key range) triples, sequence-major (with `combine`: (sequence, K/V head) pairs);
// per instruction set one function for a pool in q's dtype and one for an int8 pool
using DecodeAttention = void (*)(const AttentionArgs& a, int64_t task0, int64_t task1);
extern const DecodeAttention decode_attention_avx512, decode_attention_avx2;
extern const DecodeAttention decode_attention_int8_avx512, decode_attention_int8_avx2;
extern const DecodeAttention decode_attention_avx512bf16;  // AVX512-BF16: a bfloat16 pool's scores as bf16 dot products

}  // namespace ir
