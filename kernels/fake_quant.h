// Group-wise symmetric fake quantization of a trainable linear weight W[n, k] (nn.Linear layout), with learnable
// per-group scales (LSQ, Esser et al., arXiv 1902.08153) and an optional learnable clipping factor per module
// ("module-wise dynamic scaling", Tao et al., arXiv 2203.10705). Groups are group_size consecutive columns of a
// row, as in the int4 format (kernels/int4_format.h), so a trained weight exports to it bit for bit.
//
// forward, for a weight w in group (r, g), bits b in 2..8, qmin = -2^(b-1), qmax = 2^(b-1) - 1:
//   s_e  = bf16(gamma * s[r, g])          the effective scale, rounded to bf16 because that is what the int4
//                                         checkpoint stores (gamma = 1 without a clip factor)
//   q    = clamp(round_half_even(w / s_e), qmin, qmax)
//   wq   = s_e * q                         (wq overwritten; exact on the CPU: the value the int4 checkpoint holds.
//                                         CUDA writes bf16(s_e * q), the int4 GEMM's own device dequantization)
// backward, with dwq = dL/dwq (fp32, from the weight-gradient GEMM) and v = w / s_e:
//   dw[i]     = dwq[i]  if qmin <= v <= qmax, else 0                  straight-through estimator (overwritten)
//   ds_e[r,g] = sum_i dwq[i] * (q_i - v_i if in range, else q_i)      dL/ds_e (the bf16 rounding of s_e is
//                                                                     passed straight through)
//   dscale[r,g] = lsq_scale * gamma * ds_e[r,g]                       (overwritten) the LSQ step-size gradient
//   dclip     += sum_{r,g} s[r,g] * ds_e[r,g]                         (accumulates; only when clip != nullptr)
//   lsq_scale = 1 / sqrt(group_size * qmax), LSQ's gradient scale on the step sizes only (it keeps their update
//   in proportion to the weights' updates); the clip factor gets its plain gradient.
// dw may alias dwq (the trainer converts its weight-gradient buffer in place). The CUDA backward reduces dclip
// through per-row partials in a fixed order, so it is deterministic.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/int4_format.h"

namespace qkd {

constexpr int kFakeQuantMinBits = 2;
constexpr int kFakeQuantMaxBits = 8;

template <typename T>
struct FakeQuantArgs {
  T* wq;               // [n, k]  out
  const float* w;      // [n, k]  fp32 master weight
  const float* scale;  // [n, k / group_size]  learnable step sizes (the int4 rule may make one negative, or 0 for
                       //                       an all-zero group: then q = 0 and dw = dwq)
  const float* clip;   // [1] the module's gamma, or nullptr (gamma = 1)
  int n, k, group_size, bits;
};

struct FakeQuantBackwardArgs {
  float* dw;             // [n, k]  overwritten (may alias dwq)
  float* dscale;         // [n, k / group_size]  overwritten
  float* dclip;          // [1] accumulated (+=), or nullptr when clip is nullptr
  const float* dwq;      // [n, k]
  const float* w;        // [n, k]
  const float* scale;    // [n, k / group_size]
  const float* clip;     // [1] or nullptr
  int n, k, group_size, bits;
  float* scratch = nullptr;  // CUDA only, when clip != nullptr: [n] per-row partials of dclip
};

namespace cpu {
void fake_quant_forward(const FakeQuantArgs<float>& a);
void fake_quant_backward(const FakeQuantBackwardArgs& a);

// Round-to-nearest initial step sizes for bits b, the rule int4_quantize_group uses for 4 bits: per group, the
// candidates amax / qmax (nothing clips) and x_ext / qmin (the value of largest magnitude lands on qmin), each
// rounded to bf16, keeping the one with the smaller squared error; with ClipMse also the same two for each clipped
// range (int4_symmetric_scale). scale [n, k / group_size] overwritten.
void fake_quant_init_scales(const float* w, int n, int k, int group_size, int bits, float* scale,
                            Int4ScaleSearch search = Int4ScaleSearch::None);

// The int4 weight that the forward's wq equals exactly: u = q + 8, scales = bf16 bits of s_e, symmetric, bf16
// scales. For bits < 4 the codes use a sub-range of the 16 levels; bits > 4 cannot be stored and throw.
Int4HostWeight fake_quant_export(const float* w, const float* scale, const float* clip, int n, int k, int group_size,
                                 int bits);

// Checks the arguments shared by both directions; throws qkd::Error naming `what` and the value.
void fake_quant_check(int n, int k, int group_size, int bits, const char* what);
}  // namespace cpu

namespace cuda {
void fake_quant_forward(const FakeQuantArgs<__nv_bfloat16>& a, cudaStream_t stream);
void fake_quant_backward(const FakeQuantBackwardArgs& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
