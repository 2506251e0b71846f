// GGUF blocks and weight packing at load (convert.h). The loops over bytes and floats are plain C++ compiled for
// AVX2 (the extension runs only where the CPU has it: ops.cpp's check) but not FMA, so every product and sum
// rounds as numpy's and torch's do and results equal the Python references exactly. Only those loops are: like
// the *_avx2.cpp files, the torch code around them stays at the baseline instruction set (an inline function of
// torch's compiled for AVX2 here could be the copy the whole extension links to).
#include "convert.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace ir {
namespace {

float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// One block's float32 values, as gguf's numpy dequantization computes them (Q4_K: as our exact int4 form
// computes them, (q - 8) * scale + zero). Loops over whole runs of 16 or 32 so the compiler vectorizes them.
using Dequantize = void (*)(const uint8_t* b, float* out);

#pragma GCC push_options
#pragma GCC target("avx2")

void q4k_grid(const uint8_t* b, float* scale, float* zero) {  // the 8 sub-blocks' scale and zero
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* s = b + 4;
  for (int j = 0; j < 8; ++j) {
    const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    scale[j] = d * static_cast<float>(sc);
    zero[j] = 8.0f * scale[j] - dmin * static_cast<float>(mn);
  }
}

void q4k(const uint8_t* b, float* out) {
  float scale[8], zero[8];
  q4k_grid(b, scale, zero);
  const uint8_t* qs = b + 16;
  for (int run = 0; run < 4; ++run) {
    const float s0 = scale[2 * run], z0 = zero[2 * run], s1 = scale[2 * run + 1], z1 = zero[2 * run + 1];
    for (int k = 0; k < 32; ++k) {
      out[run * 64 + k] = (static_cast<float>(qs[run * 32 + k] & 0x0F) - 8.0f) * s0 + z0;
      out[run * 64 + 32 + k] = (static_cast<float>(qs[run * 32 + k] >> 4) - 8.0f) * s1 + z1;
    }
  }
}

void q8_0(const uint8_t* b, float* out) {
  const float d = half_at(b);
  for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

void q5_0(const uint8_t* b, float* out) {
  const float d = half_at(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int i = 0; i < 16; ++i) {  // the high bits as int: uint32 arithmetic would wrap below zero
    const int hi0 = static_cast<int>((qh >> i) & 1), hi1 = static_cast<int>((qh >> (16 + i)) & 1);
    out[i] = d * static_cast<float>(((qs[i] & 0x0F) | (hi0 << 4)) - 16);
    out[16 + i] = d * static_cast<float>(((qs[i] >> 4) | (hi1 << 4)) - 16);
  }
}

void q6_k(const uint8_t* b, float* out) {  // two halves of 128: ql[64], qh[32] each; 16 int8 scales; d last
  const float d = half_at(b + 208);
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  float ds[16];
  for (int i = 0; i < 16; ++i) ds[i] = d * static_cast<float>(sc[i]);
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = b + h * 64, *qh = b + 128 + h * 32;
    float* o = out + h * 128;
    for (int l = 0; l < 32; ++l) {  // elements l, 32 + l, 64 + l, 96 + l of the half
      const int is = l / 16;
      o[l] = ds[h * 8 + is] * static_cast<float>(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
      o[32 + l] = ds[h * 8 + is + 2] * static_cast<float>(((ql[32 + l] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
      o[64 + l] = ds[h * 8 + is + 4] * static_cast<float>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      o[96 + l] = ds[h * 8 + is + 6] * static_cast<float>(((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
  }
}

uint32_t abs_max_bits(const float* w, int64_t n) {  // |w| as bits: non-negative floats order as their bits
  uint32_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, w + k, 4);
    m = std::max(m, bits & 0x7FFFFFFFu);
  }
  return m;
}

#pragma GCC pop_options

struct Format {
  int64_t block, bytes;  // elements and bytes per block
  Dequantize dequantize;
};

Format format(const std::string& qtype) {
  if (qtype == "Q4_K") return {256, 144, q4k};
  if (qtype == "Q5_0") return {32, 22, q5_0};
  if (qtype == "Q6_K") return {256, 210, q6_k};
  if (qtype == "Q8_0") return {32, 34, q8_0};
  TORCH_CHECK(false, "no native conversion for ", qtype, " (Q4_K, Q5_0, Q6_K and Q8_0 have one)");
}

Format checked(const torch::Tensor& blocks, const Format& fmt, const std::string& qtype, int64_t cols) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "blocks must be contiguous uint8 [rows, bytes]");
  TORCH_CHECK(cols % fmt.block == 0, "cols=", cols, " is not a multiple of ", qtype, "'s block ", fmt.block);
  TORCH_CHECK(blocks.size(1) == cols / fmt.block * fmt.bytes, "a row of ", cols, " ", qtype, " values is ",
              cols / fmt.block * fmt.bytes, " bytes, not ", blocks.size(1));
  return fmt;
}

void dequantize_row(const Format& fmt, const uint8_t* row, int64_t cols, float* w) {
  for (int64_t j = 0; j < cols / fmt.block; ++j) fmt.dequantize(row + j * fmt.bytes, w + j * fmt.block);
}

#pragma GCC push_options
#pragma GCC target("avx2")

// q = clamp(round(w / scale), -127, 127), rounding half to even as torch.round does; clamping before rounding
// gives the same integers. By hand: the compiler leaves the clamp's comparisons scalar.
void quantize_row(const float* w, int64_t cols, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 8 <= cols; k += 8) {
    const __m256 x = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_div_ps(_mm256_loadu_ps(w + k), s)));
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < cols; ++k) q[k] = static_cast<int8_t>(std::nearbyint(std::min(127.0f, std::max(-127.0f, w[k] / scale))));
}

void q4k_codes(const uint8_t* b, uint8_t* q, float* scale, float* zero) {  // one super-block: 256 codes, 8 grids
  q4k_grid(b, scale, zero);
  const uint8_t* qs = b + 16;
  for (int run = 0; run < 4; ++run)
    for (int k = 0; k < 32; ++k) {
      q[run * 64 + k] = qs[run * 32 + k] & 0x0F;
      q[run * 64 + 32 + k] = qs[run * 32 + k] >> 4;
    }
}

// One tile of 16 rows in the int4 layout from its rows of codes (stride K) and grids (stride G); rows from
// `valid` on are the zero padding of a last tile.
void pack_int4_tile(const uint8_t* q, int valid, const float* s, const float* z, int64_t K, int64_t group,
                    uint8_t* out, at::Half* sz) {
  const int64_t G = K / group;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t run = 0; run < group / 8; ++run)  // [runs, 16 rows, 4 k]: low nibble k, high nibble k + 4
      for (int i = 0; i < 16; ++i)
        for (int kk = 0; kk < 4; ++kk) {
          const int64_t k = g * group + run * 8 + kk;
          *out++ = i < valid ? static_cast<uint8_t>(q[i * K + k] | (q[i * K + k + 4] << 4)) : 0;
        }
    at::Half* h = sz + g * 32;  // 16 scales, then 16 zeros
    for (int i = 0; i < 16; ++i) {
      h[i] = i < valid ? at::Half(s[i * G + g]) : at::Half(0.0f);
      h[16 + i] = i < valid ? at::Half(z[i * G + g]) : at::Half(0.0f);
    }
  }
}

void pack_int8_tile(const int8_t* q, int valid, int64_t K, uint8_t* out) {  // [K / 4, 16 rows, 4 k] of q + 128
  for (int64_t k4 = 0; k4 < K / 4; ++k4)
    for (int i = 0; i < 16; ++i)
      for (int kk = 0; kk < 4; ++kk)
        *out++ = i < valid ? static_cast<uint8_t>(q[i * K + k4 * 4 + kk] + 128) : 128;
}

#pragma GCC pop_options

int valid_rows(int64_t t, int64_t N) { return static_cast<int>(std::min<int64_t>(16, N - t * 16)); }

}  // namespace

std::vector<torch::Tensor> gguf_q4k(const torch::Tensor& blocks, int64_t rows, int64_t cols) {
  checked(blocks, format("Q4_K"), "Q4_K", cols);
  TORCH_CHECK(blocks.size(0) == rows, "blocks hold ", blocks.size(0), " rows, not ", rows);
  const int64_t nsb = cols / 256;
  auto q = torch::empty({rows, cols}, torch::kUInt8);
  auto scale = torch::empty({rows, cols / 32}, torch::kFloat), zero = torch::empty({rows, cols / 32}, torch::kFloat);
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  at::parallel_for(0, rows * nsb, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) q4k_codes(base + i * 144, qp + i * 256, sp + i * 8, zp + i * 8);
  });
  return {q, scale, zero};
}

std::vector<torch::Tensor> gguf_q4k_packed(const torch::Tensor& blocks, int64_t cols) {
  checked(blocks, format("Q4_K"), "Q4_K", cols);
  const int64_t N = blocks.size(0), K = cols, G = K / 32, T = (N + 15) / 16, nsb = K / 256;
  auto packed = torch::empty({T * 16 * K / 2}, torch::kUInt8);
  auto sz = torch::empty({T * G * 32}, torch::kHalf);
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::Half* szp = sz.data_ptr<at::Half>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> q(16 * K);  // one tile's codes and grids, then packed
    std::vector<float> s(16 * G), z(16 * G);
    for (int64_t t = t0; t < t1; ++t) {
      const int valid = valid_rows(t, N);
      for (int i = 0; i < valid; ++i)
        for (int64_t b = 0; b < nsb; ++b)
          q4k_codes(base + ((t * 16 + i) * nsb + b) * 144, q.data() + i * K + b * 256, s.data() + i * G + b * 8,
                    z.data() + i * G + b * 8);
      pack_int4_tile(q.data(), valid, s.data(), z.data(), K, 32, out + t * 8 * K, szp + t * G * 32);
    }
  });
  return {packed, sz};
}

torch::Tensor gguf_dequantize(const torch::Tensor& blocks, const std::string& qtype, int64_t cols) {
  const Format fmt = checked(blocks, format(qtype), qtype, cols);
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1);
  auto w = torch::empty({N, cols}, torch::kFloat);
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequantize_row(fmt, base + r * row_bytes, cols, out + r * cols);
  });
  return w;
}

torch::Tensor gguf_row_amax(const torch::Tensor& blocks, const std::string& qtype, int64_t cols) {
  const Format fmt = checked(blocks, format(qtype), qtype, cols);
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1);
  auto amax = torch::empty({N}, torch::kFloat);
  float* out = amax.data_ptr<float>();
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> w(cols);
    for (int64_t r = r0; r < r1; ++r) {
      dequantize_row(fmt, base + r * row_bytes, cols, w.data());
      const uint32_t m = abs_max_bits(w.data(), cols);
      std::memcpy(out + r, &m, 4);
    }
  });
  return amax;
}

torch::Tensor gguf_int8(const torch::Tensor& blocks, const std::string& qtype, int64_t cols,
                        const torch::Tensor& scales, bool packed) {
  const Format fmt = checked(blocks, format(qtype), qtype, cols);
  const int64_t N = blocks.size(0), K = cols, row_bytes = blocks.size(1), T = (N + 15) / 16;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == N,
              "scales must be one contiguous float32 per row");
  TORCH_CHECK(!packed || K % 4 == 0, "the int8 layout needs cols to be a multiple of 4");
  auto result = packed ? torch::empty({T * 16 * K}, torch::kUInt8) : torch::empty({N, K}, torch::kInt8);
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> w(K);
    std::vector<int8_t> tile(packed ? 16 * K : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int valid = valid_rows(t, N);
      for (int i = 0; i < valid; ++i) {
        const int64_t r = t * 16 + i;
        dequantize_row(fmt, base + r * row_bytes, K, w.data());
        quantize_row(w.data(), K, s[r], packed ? tile.data() + i * K : result.data_ptr<int8_t>() + r * K);
      }
      if (packed) pack_int8_tile(tile.data(), valid, K, result.data_ptr<uint8_t>() + t * 16 * K);
    }
  });
  return result;
}

std::vector<torch::Tensor> pack_int4(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros,
                                     int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(), "q must be contiguous uint8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), G = K / group, T = (N + 15) / 16;
  TORCH_CHECK(group % 8 == 0 && K % group == 0, "group must be a multiple of 8 dividing K");
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == N * G,
                "scales and zeros must be contiguous float32 [N, K / group]");
  auto packed = torch::empty({T * 16 * K / 2}, torch::kUInt8);
  auto sz = torch::empty({T * G * 32}, torch::kHalf);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::Half* szp = sz.data_ptr<at::Half>();
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      pack_int4_tile(qp + t * 16 * K, valid_rows(t, N), sp + t * 16 * G, zp + t * 16 * G, K, group, out + t * 8 * K,
                     szp + t * G * 32);
  });
  return {packed, sz};
}

torch::Tensor pack_int8(const torch::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(), "q must be contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), T = (N + 15) / 16;
  TORCH_CHECK(K % 4 == 0, "K must be a multiple of 4");
  auto packed = torch::empty({T * 16 * K}, torch::kUInt8);
  const int8_t* qp = q.data_ptr<int8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) pack_int8_tile(qp + t * 16 * K, valid_rows(t, N), K, out + t * 16 * K);
  });
  return packed;
}

}  // namespace ir
