// Fused softmax losses over the vocabulary for one block of rows. The trainer computes the logits chunk by chunk
// (a block of tokens times the LM head), calls this, and turns the logit gradients written here into the
// hidden-state and LM-head gradients before the next chunk: no more than one block of logit gradients exists.
//
// Per row r with student logits z, teacher logits t (optional), target y (optional, y < 0 means "ignore"),
// temperature tau:
//   ce[r] = -log softmax(z)[y]                              (0 when y < 0 or targets == nullptr)
//   kl[r] = tau^2 * KL(softmax(t / tau) || softmax(z / tau))   (0 when teacher == nullptr)
//   dz    = grad_scale * ( ce_weight * (softmax(z) - onehot(y))  +  kl_weight * tau * (softmax(z/tau) - softmax(t/tau)) )
// tau^2 on the KL keeps its gradient's size independent of the temperature (Hinton et al.). ce/kl overwritten;
// dz overwrites the logits in place when grad == LossGrad::Write. Rows are `ld` elements apart (>= vocab).
// Reductions over the vocabulary run in fp32 (acc_t<T>) with the max subtracted first; the CUDA version makes one
// pass for the maxima and sums (online softmax) and a second that writes dz.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/dtype.h"

namespace qkd {

enum class LossGrad { None, Write };

template <typename T>
struct SoftmaxLossArgs {
  T* logits;                // [rows, ld]  student logits; dz on return when grad == Write
  const T* teacher;         // [rows, ld]  teacher logits, or nullptr
  const int32_t* targets;   // [rows]      target ids (< 0: ignored), or nullptr
  acc_t<T>* ce;             // [rows]      per-row cross-entropy, or nullptr
  acc_t<T>* kl;             // [rows]      per-row tau^2 KL, or nullptr
  int rows, vocab;
  int64_t ld;
  float temperature = 1.0f;
  float ce_weight = 1.0f;
  float kl_weight = 0.0f;
  float grad_scale = 1.0f;  // usually 1 / (tokens in the step)
  LossGrad grad = LossGrad::Write;
};

namespace cpu {
void softmax_loss(const SoftmaxLossArgs<float>& a);
void softmax_loss(const SoftmaxLossArgs<double>& a);
}  // namespace cpu
namespace cuda {
void softmax_loss(const SoftmaxLossArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
