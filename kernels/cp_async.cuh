// Asynchronous global-to-shared copies (sm_80+ cp.async), shared by the attention kernels: they stage K/V tiles
// in shared memory while the previous tile is being computed.
#pragma once

#include <cstdint>

namespace qkd::cuda {

// 16 bytes global -> shared, bypassing L1 (.cg: each tile is read once). When !valid nothing is read and the 16
// bytes are zero-filled, so tails past the end of the context need no separate path.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace qkd::cuda
