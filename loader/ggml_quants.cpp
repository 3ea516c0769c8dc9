#include "loader/ggml_quants.h"

#include <cstring>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace qkd {

size_t ggml_block_bytes(DType t) {
  switch (t) {
    case DType::Q8_0: return 2 + 32;
    case DType::Q4_0: return 2 + 16;
    case DType::Q4_1: return 2 + 2 + 16;
    default: fail("ggml_block_bytes: {} is not a block-quantized type", dtype_name(t));
  }
}

size_t ggml_row_bytes(DType t, int64_t n) {
  switch (t) {
    case DType::F32: case DType::I32: return static_cast<size_t>(n) * 4;
    case DType::F16: case DType::BF16: return static_cast<size_t>(n) * 2;
    default:
      QKD_CHECK(n % kGgmlBlock == 0, "{} rows must be a multiple of {} values, got {}", dtype_name(t), kGgmlBlock, n);
      return static_cast<size_t>(n / kGgmlBlock) * ggml_block_bytes(t);
  }
}

static uint16_t load_u16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);  // blocks are packed: fields are not aligned
  return v;
}

void dequantize_blocks(DType t, const std::byte* src, int64_t n, float* dst) {
  QKD_CHECK(n % kGgmlBlock == 0, "dequantize {}: {} values is not a multiple of {}", dtype_name(t), n, kGgmlBlock);
  const size_t bb = ggml_block_bytes(t);
  for (int64_t b = 0; b < n / kGgmlBlock; ++b) {
    const std::byte* blk = src + b * bb;
    float* out = dst + b * kGgmlBlock;
    const float d = fp16_to_float(load_u16(blk));
    switch (t) {
      case DType::Q8_0:
        for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
        break;
      case DType::Q4_0:
        for (int j = 0; j < 16; ++j) {
          const uint8_t q = static_cast<uint8_t>(blk[2 + j]);
          out[j] = d * static_cast<float>((q & 0x0f) - 8);
          out[j + 16] = d * static_cast<float>((q >> 4) - 8);
        }
        break;
      case DType::Q4_1: {
        const float m = fp16_to_float(load_u16(blk + 2));
        for (int j = 0; j < 16; ++j) {
          const uint8_t q = static_cast<uint8_t>(blk[4 + j]);
          out[j] = d * static_cast<float>(q & 0x0f) + m;
          out[j + 16] = d * static_cast<float>(q >> 4) + m;
        }
        break;
      }
      default: fail("dequantize_blocks: {} is not a block-quantized type", dtype_name(t));
    }
  }
}

}  // namespace qkd
