// CUDA rotary position embedding on INTERLEAVED pairs, in place (kernels/rope.h), bf16 storage, fp32 math.
//   pair i of each head: (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i]
//     x[2i]   = x[2i] cos - x[2i+1] sin
//     x[2i+1] = x[2i] sin + x[2i+1] cos                 (x updated in place)
//   backward: the same rotation by -angle (x holds the gradient, updated in place)
// One block per token: the block first builds that token's cos/sin table in shared memory (head_dim/2 entries,
// shared by all heads), then rotates the token's row 8 elements (16 bytes) per access. Positions come from the
// runtime, which validates them (the kernel trusts them, as the header says of all device-side indices).
// Forward and backward are one kernel: the backward negates the sine, which is exact, so its rotation is the
// forward's to the last bit of cos/sin.
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/rope.h"

namespace qkd::cuda {

namespace {

enum class Rotation { Forward, Inverse };  // by +angle (forward), by -angle (backward)

}  // namespace

// ------------------------------------------------------------------------------------------ forward and backward

// sin_sign: +1 rotates by +angle, -1 by -angle.
static __global__ void rope_kernel(__nv_bfloat16* x, const int32_t* positions, const float* inv_freq, int half,
                                   int head_dim, int vecs_per_token, float sin_sign) {
  extern __shared__ float table[];  // [0, half): cos, [half, 2*half): sin
  const float pos = static_cast<float>(positions[blockIdx.x]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    // pos * inv_freq reaches thousands of radians, where one fp32 rounding of the product is already ~1e-4 rad.
    // Splitting the exact product into hi + lo (the fma gives the product's rounding error exactly) and
    // correcting the sine/cosine of hi to second order in lo (|lo| <= half an ulp of hi, ~4e-3 at 1e5 rad)
    // recovers the angle to fp32 precision.
    const float hi = pos * inv_freq[i];
    const float lo = fmaf(pos, inv_freq[i], -hi);
    float s, c;
    sincosf(hi, &s, &c);
    const float half_lo2 = 0.5f * lo * lo;
    table[i] = c - lo * s - half_lo2 * c;
    table[half + i] = sin_sign * (s + lo * c - half_lo2 * s);
  }
  __syncthreads();
  uint4* row = reinterpret_cast<uint4*>(x) + static_cast<int64_t>(blockIdx.x) * vecs_per_token;
  for (int v = threadIdx.x; v < vecs_per_token; v += blockDim.x) {
    uint4 raw = row[v];
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
    // head_dim is even, so the 4 pairs of an 8-element vector never straddle a pair; they may straddle heads.
    const int first = (v * 8) % head_dim / 2;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = (first + k) % half;  // past the head's last pair: the next head's first pairs
      const float2 p = __bfloat1622float2(pairs[k]);
      const float c = table[i], s = table[half + i];
      pairs[k] = __floats2bfloat162_rn(p.x * c - p.y * s, p.x * s + p.y * c);
    }
    row[v] = raw;
  }
}

static void rope_launch(const RopeArgs<__nv_bfloat16>& a, Rotation rotation, const char* name,
                        cudaStream_t stream) {
  QKD_CHECK(a.n_tokens >= 0 && a.n_heads > 0, "{}: n_tokens {} / n_heads {} invalid", name, a.n_tokens, a.n_heads);
  QKD_CHECK(a.head_dim > 0 && a.head_dim % 2 == 0 && a.head_dim <= 1024,
            "{}: head_dim {} must be even and in [2, 1024]", name, a.head_dim);
  const int64_t row = static_cast<int64_t>(a.n_heads) * a.head_dim;
  QKD_CHECK(row % 8 == 0, "{}: n_heads * head_dim = {} is not a multiple of 8 (16-byte accesses)", name, row);
  QKD_CHECK(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, "{}: x {} is not 16-byte aligned", name,
            static_cast<const void*>(a.x));
  if (a.n_tokens == 0) return;
  QKD_CHECK(a.positions != nullptr && a.inv_freq != nullptr, "{}: positions / inv_freq is null", name);
  const int vecs = static_cast<int>(row / 8);
  const int threads = vecs >= 256 ? 256 : (vecs + 31) / 32 * 32;
  const int half = a.head_dim / 2;
  const float sin_sign = rotation == Rotation::Forward ? 1.0f : -1.0f;
  rope_kernel<<<a.n_tokens, threads, 2 * half * sizeof(float), stream>>>(a.x, a.positions, a.inv_freq, half,
                                                                         a.head_dim, vecs, sin_sign);
  KERNEL_CHECK();
}

void rope_forward(const RopeArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  rope_launch(a, Rotation::Forward, "rope_forward", stream);
}

void rope_backward(const RopeArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  rope_launch(a, Rotation::Inverse, "rope_backward", stream);
}

}  // namespace qkd::cuda
