// attention_impl.h's decode attention compiled for AVX2 with FMA and F16C: 8-lane vectors, chunks of 8 keys.
#pragma GCC target("avx2,fma,f16c")
#include "vec8.h"
// the pragma and the vector type first: the kernel is compiled for them
#include "attention_impl.h"

namespace ir {
const DecodeAttention decode_attention_avx2 = decode_attention<Vec8, false>;
const DecodeAttention decode_attention_int8_avx2 = decode_attention<Vec8, true>;
}  // namespace ir
