// elementwise_impl.h's kernels compiled for AVX2 with FMA and F16C: 8-lane vectors, the same rounding to the dtype
// at the same points as the AVX-512 build.
#pragma GCC target("avx2,fma,f16c")
#include "vec8.h"
// the pragma and the vector type first: the kernels are compiled for them
#include "elementwise_impl.h"

namespace ir {
const Elementwise elementwise_avx2 = elementwise_table<Vec8>;
}  // namespace ir
