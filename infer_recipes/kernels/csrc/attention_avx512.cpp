// attention_impl.h's decode attention compiled for AVX-512 (with VNNI, which every CPU our AVX-512 kernels run on
// has: an int8 pool's dot products in integers): 16-lane vectors, chunks of 16 keys.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
#define IR_VNNI_DOT
#include "vec.h"
// the pragma and the vector type first: the kernel is compiled for them
#include "attention_impl.h"

namespace ir {
const DecodeAttention decode_attention_avx512 = decode_attention<Vec16, false>;
const DecodeAttention decode_attention_int8_avx512 = decode_attention<Vec16, true>;
}  // namespace ir
