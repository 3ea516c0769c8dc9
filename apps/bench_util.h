// Timing helpers shared by qkd-bench's modes (apps/qkd-bench.cpp, apps/train_bench.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

#include <cuda_runtime.h>

#include "kernels/cuda_check.h"
#include "runtime/device_memory.h"

namespace qkd::bench {

using Clock = std::chrono::steady_clock;

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  if (n == 0) return 0.0;
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Elapsed device time of one call of fn, between events recorded on `stream` around it.
template <typename Fn>
double event_ms(cudaStream_t stream, Fn&& fn) {
  runtime::CudaEvent e0, e1;
  CUDA_CHECK(cudaEventRecord(e0.get(), stream));
  fn();
  CUDA_CHECK(cudaEventRecord(e1.get(), stream));
  CUDA_CHECK(cudaEventSynchronize(e1.get()));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
  return ms;
}

}  // namespace qkd::bench
