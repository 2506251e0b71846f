// RMSNorm with the residual add, rotary embedding with the K/V cache write, SiLU-and-multiply: each one pass
// over its rows in the activation dtype, where torch takes several operators and dtype round trips
// (elementwise_impl.h), compiled here for AVX-512.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#include "vec.h"
// the pragma and the vector type first: the kernels are compiled for them
#include "elementwise_impl.h"

namespace ir {
const Elementwise elementwise_avx512 = elementwise_table<Vec16>;
}  // namespace ir
