// The torch side of the kernels: argument checks, the run-time CPU check, threads through ATen's parallel_for.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>

#include "attention.h"
#include "convert.h"
#include "elementwise.h"
#include "qgemv.h"

namespace {

// The instruction sets with kernels, best first, and the one in use: the best this CPU runs, unless use_isa()
// picked a lower one (tests run every set the CPU has). avx512bf16 is avx512 plus AVX512-BF16, which only the
// decode attention over a bfloat16 pool uses (attention_avx512bf16.cpp); the rest runs the avx512 kernels.
enum class Isa { none, avx2, avx512, avx512bf16 };

Isa best_isa() {
  static const Isa isa = [] {  // read once
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni");
    const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    return bf16 ? Isa::avx512bf16 : avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::none;
  }();
  return isa;
}

Isa current = best_isa();

const char* isa_name(Isa isa) {
  return isa == Isa::avx512bf16 ? "avx512-bf16"
         : isa == Isa::avx512   ? "avx512-vnni"
         : isa == Isa::avx2     ? "avx2"
                                : "none";
}

std::vector<std::string> isas() {  // those this CPU runs, best first
  std::vector<std::string> out;
  for (Isa isa : {Isa::avx512bf16, Isa::avx512, Isa::avx2})
    if (best_isa() >= isa) out.emplace_back(isa_name(isa));
  return out;
}

void use_isa(const std::string& name) {
  for (Isa isa : {Isa::avx512bf16, Isa::avx512, Isa::avx2})
    if (name == isa_name(isa)) {
      TORCH_CHECK(best_isa() >= isa, "this CPU does not run ", name);
      current = isa;
      return;
    }
  TORCH_CHECK(false, "unknown instruction set ", name, " (avx512-bf16, avx512-vnni or avx2)");
}

bool cpu_ok() { return current != Isa::none; }
#define CHECK_CPU() TORCH_CHECK(cpu_ok(), "this CPU lacks AVX2 with FMA and F16C, which the native kernels need")

const ir::Qgemv& qgemv() { return current >= Isa::avx512 ? ir::qgemv_avx512 : ir::qgemv_avx2; }
const ir::Elementwise& elementwise() {
  return current >= Isa::avx512 ? ir::elementwise_avx512 : ir::elementwise_avx2;
}

struct Activations {
  torch::Tensor q, d, qsum, xsum;
  ir::QuantizedRows rows;
};

Activations quantize(const torch::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % block == 0, "K=", K, " is not a multiple of the block ", block);
  Activations a;
  a.q = torch::empty({M, K}, torch::kInt8);
  a.d = torch::empty({M, K / block}, torch::kFloat);
  a.qsum = torch::empty({M, K / block}, torch::kInt32);
  a.xsum = torch::empty({M, K / block}, torch::kFloat);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const void* xp = x.data_ptr();
  auto* q = a.q.data_ptr<int8_t>();
  auto* d = a.d.data_ptr<float>();
  auto* qs = a.qsum.data_ptr<int32_t>();
  auto* xs = a.xsum.data_ptr<float>();
  // a few rows are quicker on one thread than the hand-off to several
  at::parallel_for(0, M, M * K >= (1 << 16) ? 1 : M, [&](int64_t m0, int64_t m1) {
    qgemv().quantize_rows(xp, bf16, K, block, m0, m1, q, d, qs, xs);
  });
  a.rows = {q, d, qs, xs, M, K, block};
  return a;
}

int64_t grain(int64_t M, int64_t K) {
  // tiles per task: a hand-off to another thread costs microseconds, so a task gets at least ~256k products
  return std::max<int64_t>(1, (1 << 18) / (16 * K * M));
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& sz,
                          int64_t group, int64_t N, const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("infer_recipes::int4_linear", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "group must be 32, 64 or 128");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(sz.scalar_type() == torch::kHalf && sz.is_contiguous(), "sz must be contiguous float16");
  const int64_t K = x.size(1), T = (N + 15) / 16;
  TORCH_CHECK(packed.numel() == T * 16 * K / 2, "packed holds ", packed.numel(), " bytes, not ", T * 8 * K);
  TORCH_CHECK(sz.numel() == T * 32 * (K / group), "sz has the wrong size");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N && bias->is_contiguous(),
                "bias must be N contiguous float32");
    b = bias->data_ptr<float>();
  }
  Activations a = quantize(x, group);
  auto y = torch::empty({x.size(0), N}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto* w = packed.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::Half>());
  void* yp = y.data_ptr();
  at::parallel_for(0, T, grain(x.size(0), K), [&](int64_t t0, int64_t t1) {
    qgemv().int4_tiles(a.rows, w, s, group, N, b, yp, bf16, t0, t1);
  });
  return y;
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          int64_t N, const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("infer_recipes::int8_linear", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  const int64_t K = x.size(1), T = (N + 15) / 16;
  TORCH_CHECK(packed.numel() == T * 16 * K, "packed holds ", packed.numel(), " bytes, not ", T * 16 * K);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == T * 16 && scales.is_contiguous(),
              "scales must be float32, padded to whole tiles of 16");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N && bias->is_contiguous(),
                "bias must be N contiguous float32");
    b = bias->data_ptr<float>();
  }
  Activations a = quantize(x, 32);
  auto y = torch::empty({x.size(0), N}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto* w = packed.data_ptr<uint8_t>();
  const auto* s = scales.data_ptr<float>();
  void* yp = y.data_ptr();
  at::parallel_for(0, T, grain(x.size(0), K), [&](int64_t t0, int64_t t1) {
    qgemv().int8_tiles(a.rows, w, s, N, b, yp, bf16, t0, t1);
  });
  return y;
}

// an int8 pool's scales: both given, float32 [blocks, Hkv, block_size] beside caches of int8 (else neither)
bool int8_pool(const torch::Tensor& k_cache, const c10::optional<torch::Tensor>& k_scale,
               const c10::optional<torch::Tensor>& v_scale) {
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "give both scales or neither");
  TORCH_CHECK(k_scale.has_value() == (k_cache.scalar_type() == torch::kChar),
              "an int8 pool needs its scales, and only an int8 pool has them");
  if (!k_scale) return false;
  for (const torch::Tensor* t : {&*k_scale, &*v_scale})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() == 3 &&
                    t->sizes() == k_cache.sizes().slice(0, 3),
                "scales must be contiguous float32 [blocks, Hkv, block_size]");
  return true;
}

void decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& blocks, const torch::Tensor& lens, double scale, torch::Tensor& out,
                      const c10::optional<torch::Tensor>& k_scale, const c10::optional<torch::Tensor>& v_scale,
                      int64_t splits) {
  RECORD_FUNCTION("infer_recipes::decode_attention", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, H, D] and the caches [blocks, Hkv, bs, D]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "attention runs in float32 or bfloat16");
  const bool int8 = int8_pool(k_cache, k_scale, v_scale);
  const auto cache_dtype = int8 ? torch::kChar : dtype;
  for (const torch::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == cache_dtype && t->is_contiguous(), "caches must be contiguous, in q's dtype or int8");
  TORCH_CHECK(out.scalar_type() == dtype && out.is_contiguous(), "out must be contiguous, in q's dtype");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous within a row");
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong && blocks.is_contiguous() &&
              lens.is_contiguous(), "blocks and lens must be contiguous int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D && out.sizes() == q.sizes(), "shapes differ");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= 16 && D % 16 == 0 && D <= 256,
              "needs head_dim a multiple of 16 up to 256 and at most 16 query heads per K/V head");
  TORCH_CHECK(lens.numel() == B && blocks.numel() % std::max<int64_t>(B, 1) == 0, "one length per sequence");
  if (B == 0) return;
  ir::AttentionArgs a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), blocks.data_ptr<int64_t>(),
                      lens.data_ptr<int64_t>(), out.data_ptr(), q.stride(0), blocks.numel() / B, H, Hkv,
                      k_cache.size(2), D,
                      static_cast<float>(scale), dtype == torch::kBFloat16,
                      int8 ? k_scale->data_ptr<float>() : nullptr, int8 ? v_scale->data_ptr<float>() : nullptr};
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(len, len + B);
  TORCH_CHECK(max_len <= a.blocks_per_row * a.block_size, "a length exceeds its block table");
  const ir::DecodeAttention fn = current < Isa::avx512 ? (int8 ? ir::decode_attention_int8_avx2
                                                               : ir::decode_attention_avx2)
                                 : int8 ? ir::decode_attention_int8_avx512
                                 : current == Isa::avx512bf16 ? ir::decode_attention_avx512bf16
                                                              : ir::decode_attention_avx512;
  // fewer (sequence, K/V head) pairs than ~4 per thread (a batch of one: 2 or 3 pairs on 2 threads), and long
  // enough: each pair's keys split into ranges of at least 128 keys, merged after (`splits` > 0: that many)
  const int64_t pairs = B * Hkv, want = 4 * at::get_num_threads();
  a.splits = splits > 0 ? splits
             : pairs >= want ? 1 : std::max<int64_t>(1, std::min((want + pairs - 1) / pairs, max_len / 128));
  torch::Tensor partial;
  if (a.splits > 1) {
    partial = torch::empty({pairs * a.splits * ir::partial_floats(H / Hkv, D)}, q.options().dtype(torch::kFloat));
    a.partial = partial.data_ptr<float>();
  }
  at::parallel_for(0, pairs * a.splits, max_len * D >= 4096 ? 1 : pairs * a.splits, [&](int64_t t0, int64_t t1) {
    fn(a, t0, t1);
  });
  if (a.splits > 1) {
    a.combine = true;
    fn(a, 0, pairs);  // G * D floats per range and pair: not worth a hand-off
  }
}

bool is_bf16(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
  return t.scalar_type() == torch::kBFloat16;
}

// (norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, x)
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  RECORD_FUNCTION("infer_recipes::rms_norm", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  const bool bf16 = is_bf16(x);
  const int64_t H = x.size(-1), R = x.numel() / H;
  TORCH_CHECK(x.is_contiguous() && H % 16 == 0, "x must be contiguous, its last dimension a multiple of 16");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.numel() == H, "weight must be H float32");
  const void* res = nullptr;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                residual->is_contiguous(), "residual must match x");
    res = residual->data_ptr();
  }
  auto y = torch::empty_like(x);
  auto sum = residual ? torch::empty_like(x) : x;
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  void* sp = sum.data_ptr();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, R, R * H >= (1 << 16) ? 1 : R, [&](int64_t r0, int64_t r1) {
    // without a residual the sum is x itself: reading and writing it back unchanged is harmless
    elementwise().rms_norm(xp, res, w, static_cast<float>(eps), H, bf16, yp, sp, r0, r1);
  });
  return {y, sum};
}

// rotates the q and k heads of a fused qkv output in place and writes k, v to their pool slots
void rope_cache(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t H, int64_t Hkv,
                torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                const c10::optional<torch::Tensor>& k_scale, const c10::optional<torch::Tensor>& v_scale) {
  RECORD_FUNCTION("infer_recipes::rope_cache", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  const bool bf16 = is_bf16(qkv);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [N, (H + 2 Hkv) D] with contiguous rows");
  const int64_t N = qkv.size(0), D = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && D % 32 == 0, "qkv's width or head_dim does not fit");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
              cos.is_contiguous() && sin.is_contiguous() && cos.numel() == N * D && sin.numel() == N * D,
              "cos and sin must be contiguous [N, D] in qkv's dtype");
  const bool int8 = int8_pool(k_cache, k_scale, v_scale);
  const auto cache_dtype = int8 ? torch::kChar : qkv.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == cache_dtype && v_cache.scalar_type() == cache_dtype &&
              k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(1) == Hkv,
              "the caches must be contiguous [blocks, Hkv, block_size, D] in qkv's dtype or int8");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == N,
              "one int64 slot per token");
  const int64_t capacity = k_cache.size(0) * k_cache.size(2);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < N; ++t)  // a plain loop: two tensor ops and their dispatch cost more than N compares
    TORCH_CHECK(sl[t] >= 0 && sl[t] < capacity, "slot ", sl[t], " lies outside the pool of ", capacity);
  void* p = qkv.data_ptr();
  const int64_t stride = qkv.stride(0);
  at::parallel_for(0, N, N >= 64 ? 1 : N, [&](int64_t t0, int64_t t1) {
    // an int8 pool: rotated here, written below
    elementwise().rope_cache(p, stride, cos.data_ptr(), sin.data_ptr(), H, Hkv, D, k_cache.data_ptr(),
                             v_cache.data_ptr(), int8 ? nullptr : sl, k_cache.size(2), bf16, t0, t1);
    if (int8)
      elementwise().store_int8(p, stride, H, Hkv, D, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                               k_scale->data_ptr<float>(), v_scale->data_ptr<float>(), sl, k_cache.size(2), bf16, t0,
                               t1);
  });
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  RECORD_FUNCTION("infer_recipes::silu_mul", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  CHECK_CPU();
  const bool bf16 = is_bf16(gate_up);
  const int64_t I = gate_up.size(-1) / 2, R = gate_up.numel() / (2 * I);
  TORCH_CHECK(gate_up.is_contiguous() && I % 16 == 0, "gate_up must be contiguous, half its width a multiple of 16");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto y = torch::empty(sizes, gate_up.options());
  const void* gp = gate_up.data_ptr();
  void* yp = y.data_ptr();
  at::parallel_for(0, R, R * I >= (1 << 16) ? 1 : R, [&](int64_t r0, int64_t r1) {
    elementwise().silu_mul(gp, I, bf16, yp, r0, r1);
  });
  return y;
}

}  // namespace

// y = x W^T (+ bias) for one linear of a decoder layer as `decode_layer` is handed it: kind 0 a dense weight (t0,
// through at::linear), 4 our int4 layout (t0 packed, t1 scales and zeros, `group`), 8 our int8 layout (t0 packed, t1
// scales); `bias` empty for none
torch::Tensor layer_linear(const torch::Tensor& x, int64_t kind, const torch::Tensor& t0, const torch::Tensor& t1,
                           const torch::Tensor& bias, int64_t group, int64_t N) {
  const c10::optional<torch::Tensor> b = bias.numel() ? c10::optional<torch::Tensor>(bias) : c10::nullopt;
  if (kind == 4) return int4_linear(x, t0, t1, group, N, b);
  if (kind == 8) return int8_linear(x, t0, t1, N, b);
  TORCH_CHECK(kind == 0, "unknown linear kind ", kind);
  return at::linear(x, t0, b);
}

// One fused decoder layer's decode step in one call: the same kernels in the same order as the Python layer
// (models/llama.py) runs them, without a Python call and a dispatch between each. x [N, hidden] (one token per
// sequence), residual the running sum before it (none for the first layer). linears: 4 x (t0, t1, bias) for qkv,
// o, gate_up, down; spec: 4 x (kind, group, N) (see layer_linear). Returns (h, residual) as the layer does.
std::vector<torch::Tensor> decode_layer(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                        const torch::Tensor& cos, const torch::Tensor& sin,
                                        const torch::Tensor& norm_in, const torch::Tensor& norm_post, double eps,
                                        const std::vector<torch::Tensor>& linears, const std::vector<int64_t>& spec,
                                        const c10::optional<torch::Tensor>& qk_scale, int64_t H, int64_t Hkv,
                                        torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                        const c10::optional<torch::Tensor>& k_scale,
                                        const c10::optional<torch::Tensor>& v_scale, const torch::Tensor& blocks,
                                        const torch::Tensor& lens, double scale) {
  RECORD_FUNCTION("infer_recipes::decode_layer", c10::ArrayRef<const c10::IValue>{});  // named in torch.profiler
  TORCH_CHECK(linears.size() == 12 && spec.size() == 12, "four linears: (t0, t1, bias) and (kind, group, N) each");
  auto linear = [&](const torch::Tensor& in, int i) {
    return layer_linear(in, spec[3 * i], linears[3 * i], linears[3 * i + 1], linears[3 * i + 2], spec[3 * i + 1],
                        spec[3 * i + 2]);
  };
  const int64_t N = x.size(0), D = k_cache.size(3);
  auto normed = rms_norm(x, residual, norm_in, eps);
  auto qkv = linear(normed[0], 0);
  if (qk_scale) qkv.narrow(1, 0, (H + Hkv) * D).mul_(*qk_scale);  // before RoPE: the scaling commutes with it
  rope_cache(qkv, cos, sin, H, Hkv, k_cache, v_cache, slots, k_scale, v_scale);
  auto attn = torch::empty({N, H, D}, x.options());
  decode_attention(qkv.narrow(1, 0, H * D).view({N, H, D}), k_cache, v_cache, blocks, lens, scale, attn, k_scale,
                   v_scale, 0);
  auto post = rms_norm(linear(attn.view({N, H * D}), 1), normed[1], norm_post, eps);
  return {linear(silu_mul(linear(post[0], 2)), 3), post[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_ok", &cpu_ok, "whether this CPU runs the kernels (AVX2 with FMA and F16C at least)");
  m.def("isa", [] { return std::string(isa_name(current)); }, "the instruction set the kernels use now");
  m.def("isas", &isas, "the instruction sets this CPU runs kernels for, best first");
  m.def("use_isa", &use_isa, "run the kernels of this instruction set (one this CPU has)");
  m.def("int4_linear", &int4_linear, "y = x W^T (+ bias), W int4 group-wise in the native layout");
  m.def("int8_linear", &int8_linear, "y = x W^T (+ bias), W int8 per row in the native layout");
  m.def("decode_attention", &decode_attention, "one query per sequence against its paged K/V, written into out",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("blocks"), py::arg("lens"), py::arg("scale"),
        py::arg("out"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("splits") = 0);
  m.def("rms_norm", &rms_norm, "(norm(x + residual) * weight, x + residual)");
  m.def("rope_cache", &rope_cache, "rotary on a fused qkv output in place, k and v written to their slots",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("H"), py::arg("Hkv"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate_up output");
  m.def("decode_layer", &decode_layer, "one fused decoder layer's decode step (norms, linears, rotary and the cache "
        "write, attention, silu-and-mul) in one call");
  m.def("gguf_q4k", &ir::gguf_q4k, "Q4_K blocks -> (q uint8, scale, zero float32 per 32)");
  m.def("gguf_q4k_packed", &ir::gguf_q4k_packed, "Q4_K blocks -> the native int4 layout (packed, sz)");
  m.def("gguf_dequantize", &ir::gguf_dequantize, "Q4_K, Q5_0, Q6_K or Q8_0 rows as float32");
  m.def("gguf_row_amax", &ir::gguf_row_amax, "max |w| per row of Q4_K, Q5_0, Q6_K or Q8_0 blocks");
  m.def("gguf_int8", &ir::gguf_int8, "Q4_K, Q5_0, Q6_K or Q8_0 rows as int8 against per-row scales (packed: in "
        "the native int8 layout)", py::arg("blocks"), py::arg("qtype"), py::arg("cols"), py::arg("scales"),
        py::arg("packed") = false);
  m.def("pack_int4", &ir::pack_int4, "q, scales, zeros -> the native int4 layout (packed, float16 scales/zeros)");
  m.def("pack_int8", &ir::pack_int8, "int8 q -> the native int8 layout");
}
