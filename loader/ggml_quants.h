// GGML's block-quantized formats as GGUF stores them, dequantized to fp32 on the CPU. One block covers 32
// consecutive values of a row (a row's length must be a multiple of 32):
//   Q8_0: fp16 d, int8 q[32]                     x = d * q
//   Q4_0: fp16 d, 16 bytes of nibbles            x = d * (q - 8)      q in [0, 15]
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles    x = d * q + m
// Nibble order: byte j holds value j in its low nibble and value j + 16 in its high nibble.
#pragma once

#include <cstddef>
#include <cstdint>

#include "loader/tensor.h"

namespace qkd {

constexpr int kGgmlBlock = 32;

size_t ggml_block_bytes(DType t);  // 34, 18, 20 for Q8_0, Q4_0, Q4_1
// Bytes a row of n values occupies (n a multiple of 32 for block formats).
size_t ggml_row_bytes(DType t, int64_t n);

// Dequantizes n values (n a multiple of 32) starting at a block boundary.
void dequantize_blocks(DType t, const std::byte* src, int64_t n, float* dst);

}  // namespace qkd
