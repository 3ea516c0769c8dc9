// The optimizer step: AdamW (Loshchilov & Hutter) on fp32 master weights and moments, and the global gradient
// norm used for clipping. The trainer keeps every trainable tensor in one flat fp32 buffer (and its gradient and
// moments alike), so each of these is one launch per step.
//   global norm:  sumsq = sum_i g[i]^2                                   (out overwritten, fp64 on the CPU)
//   adamw, with g = grad_scale * grad[i] (grad_scale = the clipping factor), step t >= 1:
//     m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
//     p = p - lr * ( (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p )
//     param_bf16[i] = bf16(p)                  (the compute copy, when param_bf16 != nullptr)
// weight_decay applies to the whole range given; the trainer calls adamw_update once per range with its own
// decay (matrices decay, norms and scales do not).
// The CUDA sum of squares reduces per-block partials in a fixed order: the same bits on every run.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

struct AdamWArgs {
  float* param;                 // [n] fp32 master weights, updated
  __nv_bfloat16* param_bf16;    // [n] bf16 compute copy, written when not nullptr
  float* m;                     // [n] first moment, updated
  float* v;                     // [n] second moment, updated
  const float* grad;            // [n]
  int64_t n;
  float lr, beta1, beta2, eps, weight_decay;
  float grad_scale = 1.0f;
  int64_t step = 1;             // 1-based, for the bias corrections
};

struct SumSquaresArgs {
  float* out;                   // [1] overwritten: sum of squares
  const float* x;               // [n]
  int64_t n;
  float* scratch = nullptr;     // CUDA only: [kSumSquaresBlocks] partials
};
constexpr int kSumSquaresBlocks = 1024;

namespace cpu {
void adamw_update(const AdamWArgs& a);
double sum_squares(const float* x, int64_t n);
}  // namespace cpu
namespace cuda {
void adamw_update(const AdamWArgs& a, cudaStream_t stream);
void sum_squares(const SumSquaresArgs& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
