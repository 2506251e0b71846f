// Loading: GGUF blocks onto our weight forms and the kernels' weight layouts, one pass over the bytes, rows in
// parallel. Each function computes exactly what its Python reference computes (quantization/gguf.py,
// kernels/layout.py), value for value: the tests compare them with torch.equal.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace ir {

// Q4_K super-blocks [N, K / 256 * 144] -> (q [N, K] uint8 in [0, 15], scale, zero [N, K / 32] float32).
std::vector<torch::Tensor> gguf_q4k(const torch::Tensor& blocks, int64_t rows, int64_t cols);
// The same, straight into the native int4 layout (kernels/layout.py pack_int4): (packed, scales and zeros).
std::vector<torch::Tensor> gguf_q4k_packed(const torch::Tensor& blocks, int64_t cols);
// Rows of Q4_K, Q5_0, Q6_K or Q8_0 blocks [N, bytes] as float32 [N, K] (Q4_K through its exact int4 form).
torch::Tensor gguf_dequantize(const torch::Tensor& blocks, const std::string& qtype, int64_t cols);
// The largest |w| of each row of Q4_K, Q5_0, Q6_K or Q8_0 blocks [N, bytes] -> [N] float32.
torch::Tensor gguf_row_amax(const torch::Tensor& blocks, const std::string& qtype, int64_t cols);
// The same rows as int8 against per-row scales: q = clamp(round(w / scale), -127, 127) -> [N, K] int8, or with
// `packed` straight in the native int8 layout (kernels/layout.py pack_int8).
torch::Tensor gguf_int8(const torch::Tensor& blocks, const std::string& qtype, int64_t cols,
                        const torch::Tensor& scales, bool packed);
// The native int4 layout (kernels/layout.py pack_int4): (packed uint8, scales and zeros float16).
std::vector<torch::Tensor> pack_int4(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros,
                                     int64_t group);
// The native int8 layout (kernels/layout.py pack_int8): q + 128 in tiles of 16 rows x 4 inputs.
torch::Tensor pack_int8(const torch::Tensor& q);

}  // namespace ir
