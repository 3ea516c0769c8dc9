// Deterministic warp and block sums for the CUDA kernels: a fixed butterfly within each warp, then the warps'
// values in warp order. The tree depends only on the thread layout, so a launch gives the same bits on every run
// (no atomics), and every thread of the warp or block receives the identical value.
#pragma once

namespace qkd::cuda {

// Sum over the 32 lanes of a warp (all lanes active). The xor butterfly pairs the same operands on every lane,
// and fp addition is commutative, so all lanes end with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; blockDim.x must be a multiple of 32 (at most 1024) and every thread must call it.
// `scratch` is 32 values of shared memory; the trailing barrier lets the next call reuse it at once.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : T(0);
  v = warp_sum(v);
  __syncthreads();
  return v;
}

}  // namespace qkd::cuda
