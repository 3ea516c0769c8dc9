// Eight bf16 values as one 16-byte access, converted to and from fp32: the vector width of the elementwise
// and row-wise kernels (one 128-bit load or store per thread and step).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace qkd::cuda {

constexpr int kBf16x8 = 8;

__device__ __forceinline__ void bf16x8_to_float(const uint4& u, float (&f)[kBf16x8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < kBf16x8 / 2; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Each value rounded to nearest even, once.
__device__ __forceinline__ uint4 float_to_bf16x8(const float (&f)[kBf16x8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < kBf16x8 / 2; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

}  // namespace qkd::cuda
