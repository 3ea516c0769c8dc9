// Device memory for the CUDA backend: one arena planned in full before anything is allocated, so the bytes a
// model needs are known (and compared with what the GPU has free) before the first cudaMalloc, and forward()
// never allocates. Also the RAII owners of the other CUDA objects the backend holds (stream, events, graph,
// pinned host buffer), so every error path releases them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include "kernels/cuda_check.h"

namespace qkd::runtime {

// Offsets are planned first (reserve), then the arena is allocated once (allocate) and reserved regions are
// addressed by their offsets. Every region starts on a 256-byte boundary: cuBLASLt picks its fastest kernels
// for 256-byte aligned operands, and the kernels' 16-byte vector loads need at least that.
class DeviceArena {
 public:
  static constexpr size_t kAlign = 256;

  DeviceArena() = default;
  ~DeviceArena() {
    if (base_ != nullptr) cudaFree(base_);
  }
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // Plans a region of `bytes` and returns its offset. Only before allocate().
  size_t reserve(size_t bytes) {
    QKD_CHECK(base_ == nullptr, "DeviceArena: reserve({}) after the arena was allocated", bytes);
    const size_t off = (size_ + kAlign - 1) / kAlign * kAlign;
    size_ = off + bytes;
    return off;
  }
  size_t size() const { return size_; }

  void allocate() {
    QKD_CHECK(base_ == nullptr, "DeviceArena: allocated twice");
    CUDA_CHECK(cudaMalloc(&base_, size_ > 0 ? size_ : 1));
  }

  template <typename T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(base_) + offset);
  }

 private:
  void* base_ = nullptr;
  size_t size_ = 0;
};

// Pinned host memory: copies from it run asynchronously and can be ordered with the stream's kernels.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes) { CUDA_CHECK(cudaMallocHost(&ptr_, bytes > 0 ? bytes : 1)); }
  ~PinnedBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

class CudaStream {
 public:
  CudaStream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~CudaStream() {
    if (s_ != nullptr) cudaStreamDestroy(s_);
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class CudaEvent {
 public:
  CudaEvent() { CUDA_CHECK(cudaEventCreate(&e_)); }
  ~CudaEvent() {
    if (e_ != nullptr) cudaEventDestroy(e_);
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// An instantiated CUDA graph (the captured graph itself is dropped once instantiated).
class GraphExec {
 public:
  GraphExec() = default;
  explicit GraphExec(cudaGraph_t g) {
    const cudaError_t err = cudaGraphInstantiate(&exec_, g, 0);
    cudaGraphDestroy(g);
    CUDA_CHECK(err);
  }
  ~GraphExec() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
  }
  GraphExec(GraphExec&& o) noexcept : exec_(std::exchange(o.exec_, nullptr)) {}
  GraphExec& operator=(GraphExec&& o) noexcept {
    std::swap(exec_, o.exec_);
    return *this;
  }
  void launch(cudaStream_t s) const { CUDA_CHECK(cudaGraphLaunch(exec_, s)); }
  explicit operator bool() const { return exec_ != nullptr; }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace qkd::runtime
