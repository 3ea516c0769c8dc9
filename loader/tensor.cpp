#include "loader/tensor.h"

#include <climits>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/int4_gemm.h"
#include "loader/ggml_quants.h"

namespace qkd {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::Q8_0: return "Q8_0";
    case DType::Q4_0: return "Q4_0";
    case DType::Q4_1: return "Q4_1";
    case DType::I4: return "I4";
  }
  return "unknown";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // loaders reject negative dims and overflowing products before making a view
  return n;
}

std::string TensorView::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

Int4Weight TensorView::int4_weight() const {
  QKD_CHECK(dtype == DType::I4, "tensor '{}': dtype {} is not the int4 format (I4)", name, dtype_name(dtype));
  QKD_CHECK(shape.size() == 2 && shape[0] > 0 && shape[0] <= INT_MAX && shape[1] > 0 && shape[1] <= INT_MAX,
            "tensor '{}': int4 shape {} must be [n, k] with positive 32-bit sizes", name, shape_str());
  const Int4Weight w{reinterpret_cast<const uint32_t*>(data), int4.scales, int4.mins, static_cast<int>(shape[0]),
                     static_cast<int>(shape[1]), int4.group_size, int4.sym, int4.scale_type};
  int4_check(w, name.c_str());
  QKD_CHECK(nbytes == static_cast<size_t>(int4_packed_bytes(w.n, w.k)),
            "tensor '{}': int4 {} needs {} packed bytes, the view has {}", name, shape_str(),
            int4_packed_bytes(w.n, w.k), nbytes);
  // The int4 readers dereference the words and codes directly.
  QKD_CHECK(reinterpret_cast<uintptr_t>(data) % 4 == 0 && reinterpret_cast<uintptr_t>(int4.scales) % 2 == 0 &&
                reinterpret_cast<uintptr_t>(int4.mins) % 2 == 0,
            "tensor '{}': int4 buffers are misaligned (packed words need 4 bytes, scales and mins 2)", name);
  return w;
}

// 16- and 32-bit values are read with memcpy: a view into a file need not be aligned to its dtype (a safetensors
// data section starts wherever the JSON header ends).
template <typename Bits, typename Convert>
static void convert_dense(const std::byte* src, int64_t n, float* out, Convert convert) {
  for (int64_t i = 0; i < n; ++i) {
    Bits v;
    std::memcpy(&v, src + i * static_cast<int64_t>(sizeof(Bits)), sizeof(Bits));
    out[i] = convert(v);
  }
}

void to_f32(const TensorView& t, float* out) {
  if (t.dtype == DType::I4) {
    cpu::dequantize_int4(t.int4_weight(), out);
    return;
  }
  const int64_t n = t.numel();
  const bool blocked = t.dtype == DType::Q8_0 || t.dtype == DType::Q4_0 || t.dtype == DType::Q4_1;
  // Block formats quantize each row separately, so a row (the last dim) is the unit of dequantization.
  const int64_t row_len = t.shape.empty() ? 1 : t.shape.back();
  const int64_t n_rows = row_len == 0 ? 0 : n / row_len;
  QKD_CHECK(!blocked || row_len % kGgmlBlock == 0, "tensor '{}': {} rows of {} values are not whole {}-value blocks",
            t.name, dtype_name(t.dtype), row_len, kGgmlBlock);
  const size_t expected = blocked ? static_cast<size_t>(n_rows) * ggml_row_bytes(t.dtype, row_len)
                                  : ggml_row_bytes(t.dtype, n);
  QKD_CHECK(t.nbytes == expected, "tensor '{}': {} {} needs {} bytes, the view has {}", t.name, dtype_name(t.dtype),
            t.shape_str(), expected, t.nbytes);
  if (n == 0) return;
  QKD_CHECK(t.data != nullptr, "tensor '{}': view has no data", t.name);
  switch (t.dtype) {
    case DType::F32: std::memcpy(out, t.data, t.nbytes); return;
    case DType::F16: convert_dense<uint16_t>(t.data, n, out, fp16_to_float); return;
    case DType::BF16: convert_dense<uint16_t>(t.data, n, out, bf16_to_float); return;
    case DType::I32:
      convert_dense<int32_t>(t.data, n, out, [](int32_t v) { return static_cast<float>(v); });
      return;
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_1: {
      const size_t row_bytes = ggml_row_bytes(t.dtype, row_len);
      for (int64_t r = 0; r < n_rows; ++r) dequantize_blocks(t.dtype, t.data + r * row_bytes, row_len, out + r * row_len);
      return;
    }
    case DType::I4: break;  // dequantized at the top: its byte count is not a row size
  }
  fail("tensor '{}': to_f32 does not know dtype {}", t.name, static_cast<int>(t.dtype));
}

std::vector<float> to_f32(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  to_f32(t, out.data());
  return out;
}

}  // namespace qkd
