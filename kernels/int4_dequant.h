// Dequantization of an int4 weight (kernels/int4_format.h) into a dense bf16 matrix, for products too large for
// the fused int4 kernels to win: a prompt of hundreds of tokens is compute-bound, and cuBLASLt's bf16 GEMM on
// a dequantized copy (runtime/cuda_model.cpp overlaps the copy of layer l + 1 with layer l's work) beats the
// fused int4 GEMM there (docs/int4-gemm-notes.md has the measurements).
//   out[n, k] = bf16(dequant(W)[n, k])
// Each weight is rounded to bf16 once, exactly as the fused kernels round it before the tensor cores
// (int4_device::dequant_word), so a product on the copy sees the same operands as the fused GEMM.
// CPU twin: cpu::dequantize_int4 (kernels/int4_gemm.h), which keeps the exact fp32 value.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/int4_format.h"

namespace qkd {

// Products with at least this many rows (m) run cuBLASLt on a dequantized bf16 copy of an int4 weight instead of
// the fused int4 GEMM: at this size the product is compute-bound and the fused kernel's mma.sync loop reaches about
// a third of cuBLASLt's rate (docs/int4-gemm-notes.md), while dequantizing costs 2.5 bytes a weight of memory
// traffic. The runtime's prefill (runtime/cuda_model.cpp) and the trainer's frozen layers (train/ops.cpp) use it.
constexpr int kDequantMinRows = 256;

struct Int4DequantArgs {
  __nv_bfloat16* out;  // [n, k], 16-byte aligned
  Int4Weight w;        // [n, k], device pointers
};

namespace cuda {
void int4_dequantize(const Int4DequantArgs& a, cudaStream_t stream);
}

}  // namespace qkd
