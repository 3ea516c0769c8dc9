// Weights of the CUDA backend on the device (runtime/cuda_weights.cpp): which format each linear weight is
// stored in, and how checkpoint tensors of any loader dtype get there.
//  - bf16 from F32/F16/BF16/Q8_0 (and from int4 when a fused weight mixes formats: dequantized exactly, then
//    rounded to bf16 once, as the int4 kernels round each weight);
//  - int4 (kernels/int4_format.h) from qkd int4 tensors (DType::I4, copied), GGUF Q4_0/Q4_1 (converted bit for
//    bit by int4_from_q4_0/int4_from_q4_1), or dense tensors quantized at load (ModelOptions::quantize_group).
// A device weight may stack several checkpoint tensors along its rows (q/k/v, gate/up) and may be wider than
// the checkpoint (zero columns past it), which is how the backend pads an ffn_dim the kernels cannot take.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/int4_format.h"
#include "loader/tensor.h"
#include "runtime/device_memory.h"

namespace qkd::runtime {

struct LinearFormat {
  bool int4 = false;
  int group_size = 0;  // int4: columns per group (k itself when per-channel)
  Int4Symmetry sym = Int4Symmetry::Symmetric;
  ScaleType scale_type = ScaleType::BF16;
  bool operator==(const LinearFormat&) const = default;
  std::string str() const;  // "bf16", "int4 g128 sym bf16-scales"
};

// A weight [n, k] in nn.Linear layout, in one format, in the backend's arena.
struct DeviceLinear {
  int n = 0, k = 0;
  LinearFormat fmt;
  __nv_bfloat16* w = nullptr;  // bf16: [n, k]
  Int4Weight q;                // int4: device pointers, [n, k]

  int64_t bytes() const;                  // every byte a product with it reads
  void plan(DeviceArena& arena);          // reserves its regions (before the arena is allocated)
  void bind(const DeviceArena& arena);    // points w / q into the allocated arena

 private:
  size_t off_data_ = 0, off_scales_ = 0, off_mins_ = 0;
};

// The int4 format a checkpoint tensor brings with it or gets at load, or bf16 (fmt.int4 false). k_dev is the
// device weight's width; quantize_group as in ModelOptions.
LinearFormat tensor_format(const TensorView& t, int k_dev, int quantize_group);
// The format of a device weight stacked from `parts`: their common int4 format when they agree, else bf16.
LinearFormat stacked_format(std::span<const TensorView* const> parts, int k_dev, int quantize_group);

// Writes checkpoint tensor t ([n, k_src], k_src <= dst.k) into rows [row0, row0 + n) of dst, converting to
// dst's format. Rows and columns not written keep what the arena holds (the backend zeroes it first).
// Synchronous; host memory stays bounded by converting a block of rows at a time.
void upload_rows(const DeviceLinear& dst, int row0, const TensorView& t);

// Fills rows [row0, row0 + n) of dst with random values on the device: bf16 weights uniform in
// [-scale, scale), int4 weights random nibbles with bf16 scales uniform in [scale / 16, scale / 8) (so the
// values stay within +-scale).
void fill_random_rows(const DeviceLinear& dst, int row0, int n, float scale, uint64_t seed, cudaStream_t stream);

}  // namespace qkd::runtime
