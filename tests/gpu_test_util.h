// Device buffers for the GPU tests: upload, download, and poisoning so that an unwritten output shows up.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda_check.h"

namespace qkd::test {

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) { CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T))); }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  void upload(const std::vector<T>& host) {
    CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // All bytes 0xff: NaN in bf16 and fp32, -1 as an int32 token id.
  void poison() { CUDA_CHECK(cudaMemset(ptr, 0xff, n * sizeof(T))); }
  __nv_bfloat16* bf16() const { return reinterpret_cast<__nv_bfloat16*>(ptr); }
};

}  // namespace qkd::test
