// A view of one tensor's bytes as they lie in a file (usually an mmap) or in a buffer the loader owns.
// Dense dtypes are stored row-major. Block-quantized GGUF dtypes keep their own block layout (loader/gguf.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/int4_format.h"

namespace qkd {

// I4 is the qkd int4 format (kernels/int4_format.h): data holds the packed words, int4 the rest.
enum class DType : uint8_t { F32, F16, BF16, I32, Q8_0, Q4_0, Q4_1, I4 };

const char* dtype_name(DType t);

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  // DType::I4 only; shape is the logical [n, k], data/nbytes the packed words [n, k/8].
  struct Int4Parts {
    const uint16_t* scales = nullptr;  // [n, k/group_size]
    const uint16_t* mins = nullptr;    // [n, k/group_size], asymmetric only
    int group_size = 0;
    Int4Symmetry sym = Int4Symmetry::Symmetric;
    ScaleType scale_type = ScaleType::BF16;
  } int4;

  // The int4 view of a DType::I4 tensor (throws for any other dtype).
  Int4Weight int4_weight() const;

  int64_t numel() const;
  std::string shape_str() const;  // "[384, 1024]"
};

// Every supported dtype to fp32 (dequantizing block formats); out must hold numel() floats.
void to_f32(const TensorView& t, float* out);
std::vector<float> to_f32(const TensorView& t);

}  // namespace qkd
