// attention_impl.h's decode attention compiled for AVX-512 with AVX512-BF16: a bfloat16 pool's scores are
// dot products of bfloat16 pairs (scores_bf16); everything else as in attention_avx512.cpp.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#define IR_BF16_DOT
#include "vec.h"
// the pragma and the vector type first: the kernel is compiled for them
#include "attention_impl.h"

namespace ir {
const DecodeAttention decode_attention_avx512bf16 = decode_attention<Vec16, false>;
}  // namespace ir
