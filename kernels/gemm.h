// Dense bf16 GEMM through cuBLASLt, row-major operands, fp32 accumulation:
//   y[m, n]  =  alpha * op_a(a) . op_b(b)            (Accumulate::Overwrite; y is not read)
//   y[m, n] +=  alpha * op_a(a) . op_b(b)            (Accumulate::Add)
//   op_a(a) = a, stored [m, k]       (Transpose::No)    or a^T, a stored [k, m]   (Transpose::Yes)
//   op_b(b) = b, stored [k, n]       (Transpose::No)    or b^T, b stored [n, k]   (Transpose::Yes)
// The linear layer's three products, with W [out, in] in nn.Linear layout:
//   forward  y  = x . W^T     a = x  [tokens, in],  No;   b = W [out, in],      Yes
//   dgrad    dx = dy . W      a = dy [tokens, out], No;   b = W [out, in],      No   (k = out, n = in)
//   wgrad    dW += dy^T . x   a = dy [tokens, out], Yes;  b = x [tokens, in],   No   (m = out, k = tokens)
// y is bf16 or fp32 (GemmOut::F32 for fp32 gradient accumulators).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/matmul.h"

namespace qkd {

enum class Transpose { No, Yes };
enum class GemmOut { BF16, F32 };

struct GemmArgs {
  void* y;                  // [m, n], bf16 or fp32 (out)
  const __nv_bfloat16* a;   // [m, k] (trans_a No) or [k, m] (Yes)
  const __nv_bfloat16* b;   // [k, n] (trans_b No) or [n, k] (Yes)
  int m, n, k;
  Transpose trans_a = Transpose::No;
  Transpose trans_b = Transpose::Yes;
  GemmOut out = GemmOut::BF16;
  Accumulate mode = Accumulate::Overwrite;
  float alpha = 1.0f;
};

// The cuBLASLt handle, its workspace, and the algorithm chosen for each problem shape (the heuristic query is
// made once per shape, transposes, output type and pointer alignment, then reused). Not thread-safe: one per
// thread or stream. Create it outside graph capture; a first call for a new shape allocates nothing on the
// device, so it may happen during capture.
class CublasLt {
 public:
  static constexpr size_t kDefaultWorkspace = size_t{32} << 20;  // what NVIDIA recommends for Hopper

  explicit CublasLt(size_t workspace_bytes = kDefaultWorkspace);
  ~CublasLt();
  CublasLt(const CublasLt&) = delete;
  CublasLt& operator=(const CublasLt&) = delete;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

namespace cuda {
void gemm(CublasLt& lt, const GemmArgs& a, cudaStream_t stream);
}

}  // namespace qkd
