// The arithmetic Vec16 (vec.h) and Vec8 (vec8.h) share, written once over their members: each derives from
// VecMath<itself>.
#pragma once

namespace ir {

template <typename V>
struct VecMath {
  // e^x: 2^(x log2 e), the fraction by a degree-6 polynomial (relative error ~1e-7), the integer part by
  // V::ldexp; the clamp keeps the result a normal float
  template <typename F>
  static F exp(F x) {
    x = V::max(V::min(x, V::set1(88.0f)), V::set1(-87.0f));
    const F t = V::mul(x, V::set1(1.4426950408889634f));
    const F n = V::round_nearest(t);
    const F f = V::sub(t, n);
    F p = V::set1(1.5403530393381606e-4f);
    p = V::fmadd(p, f, V::set1(1.3333558146428443e-3f));
    p = V::fmadd(p, f, V::set1(9.618129107628477e-3f));
    p = V::fmadd(p, f, V::set1(5.550410866482158e-2f));
    p = V::fmadd(p, f, V::set1(0.2402265069591007f));
    p = V::fmadd(p, f, V::set1(0.6931471805599453f));
    return V::ldexp(V::fmadd(p, f, V::set1(1.0f)), n);
  }
};

}  // namespace ir
