// The two backends the training engine (train/transformer.h, train/engine_impl.h) is written against once:
//   CpuOps   fp32 activations and weights, the CPU twins of kernels/cpu/ — the reference, and the CI backend;
//   CudaOps  bf16 activations and compute weights, fp32 master weights and gradients, the CUDA kernels of kernels/
//            and cuBLASLt, all on one stream.
// Both expose the same member functions over their activation type T, so the model's forward and backward are
// one sequence of op calls. Memory is owned by the ops object and is allocated only while the engine is built,
// never during a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/embedding.h"
#include "kernels/fake_quant.h"
#include "kernels/gemm.h"
#include "kernels/int4_format.h"
#include "kernels/l2norm.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/softmax_loss.h"
#include "kernels/swiglu.h"

namespace qkd::train {

class CpuOps {
 public:
  using T = float;
  static constexpr const char* kName = "cpu";

  template <typename U>
  U* alloc(int64_t n) {
    auto buf = std::make_unique<std::byte[]>(static_cast<size_t>(n > 0 ? n : 1) * sizeof(U));
    std::memset(buf.get(), 0, static_cast<size_t>(n > 0 ? n : 1) * sizeof(U));
    U* p = reinterpret_cast<U*>(buf.get());
    owned_.push_back(std::move(buf));
    return p;
  }
  template <typename U>
  void upload(U* dst, const U* src, int64_t n) { std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(U)); }
  template <typename U>
  void download(U* dst, const U* src, int64_t n) { std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(U)); }
  template <typename U>
  void copy(U* dst, const U* src, int64_t n) { std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(U)); }
  template <typename U>
  void zero(U* p, int64_t n) { std::memset(p, 0, static_cast<size_t>(n) * sizeof(U)); }
  void sync() {}
  // host fp32 values -> compute precision on the backend (T is fp32 here: a copy).
  void to_compute(T* dst, const float* host_src, int64_t n) { upload(dst, host_src, n); }
  // Uploads an int4 weight and returns a view of the copy.
  Int4Weight upload_int4(const Int4HostWeight& w);

  // y (=|+=) alpha * x[m, k] . w[n, k]^T
  void linear(T* y, const T* x, const T* w, int m, int n, int k, Accumulate mode, float alpha = 1.0f);
  // dx (=|+=) alpha * dy[m, n] . w[n, k]
  void linear_dgrad(T* dx, const T* dy, const T* w, int m, int n, int k, Accumulate mode, float alpha = 1.0f);
  // dw[n, k] += dy[m, n]^T . x[m, k]   (fp32)
  void linear_wgrad(float* dw, const T* dy, const T* x, int m, int n, int k);
  void int4_linear(T* y, const T* x, const Int4Weight& w, int m, Accumulate mode);
  void int4_linear_dgrad(T* dx, const T* dy, const Int4Weight& w, int m, Accumulate mode);

  void embedding(const EmbeddingArgs<T>& a) { cpu::embedding_forward(a); }
  void embedding_backward(const EmbeddingBackwardArgs<T>& a) { cpu::embedding_backward(a); }
  void rmsnorm(const RmsNormArgs<T>& a) { cpu::rmsnorm_forward(a); }
  void rmsnorm_backward(const RmsNormBackwardArgs<T>& a) { cpu::rmsnorm_backward(a); }
  void rope(const RopeArgs<T>& a) { cpu::rope_forward(a); }
  void rope_backward(const RopeArgs<T>& a) { cpu::rope_backward(a); }
  void attention(const AttentionArgs<T>& a) { cpu::attention_forward(a); }
  void attention_backward(const AttentionBackwardArgs<T>& a) { cpu::attention_backward(a); }
  void swiglu(const SwigluArgs<T>& a) { cpu::swiglu_forward(a); }
  void swiglu_backward(const SwigluBackwardArgs<T>& a) { cpu::swiglu_backward(a); }
  void softmax_loss(const SoftmaxLossArgs<T>& a) { cpu::softmax_loss(a); }
  void l2norm(const L2NormArgs<T>& a) { cpu::l2norm_forward(a); }
  void l2norm_backward(const L2NormBackwardArgs<T>& a) { cpu::l2norm_backward(a); }
  void fake_quant(const FakeQuantArgs<T>& a) { cpu::fake_quant_forward(a); }
  void fake_quant_backward(const FakeQuantBackwardArgs& a) { cpu::fake_quant_backward(a); }
  void adamw(const AdamWArgs& a) { cpu::adamw_update(a); }
  // sum of squares of x[n], returned to the host (synchronises)
  double sum_squares(const float* x, int64_t n) { return cpu::sum_squares(x, n); }
  // Scratch sizes of the ops that need one (0 on the CPU).
  int64_t rmsnorm_scratch(int, int) const { return 0; }
  int64_t attention_scratch(int, int, int, int, int) const { return 0; }

 private:
  std::vector<std::unique_ptr<std::byte[]>> owned_;
};

class CudaOps {
 public:
  using T = __nv_bfloat16;
  static constexpr const char* kName = "cuda";

  CudaOps();
  ~CudaOps();
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  // Throws qkd::Error with the bytes asked for and the bytes free when the GPU cannot hold the buffer.
  void* alloc_bytes(size_t bytes);
  template <typename U>
  U* alloc(int64_t n) {
    return static_cast<U*>(alloc_bytes(static_cast<size_t>(n > 0 ? n : 1) * sizeof(U)));
  }
  template <typename U>
  void upload(U* dst, const U* src, int64_t n) { copy_bytes(dst, src, static_cast<size_t>(n) * sizeof(U), cudaMemcpyHostToDevice); }
  template <typename U>
  void download(U* dst, const U* src, int64_t n) { copy_bytes(dst, src, static_cast<size_t>(n) * sizeof(U), cudaMemcpyDeviceToHost); }
  template <typename U>
  void copy(U* dst, const U* src, int64_t n) { copy_bytes(dst, src, static_cast<size_t>(n) * sizeof(U), cudaMemcpyDeviceToDevice); }
  template <typename U>
  void zero(U* p, int64_t n) { zero_bytes(p, static_cast<size_t>(n) * sizeof(U)); }
  void sync();
  void to_compute(T* dst, const float* host_src, int64_t n);
  Int4Weight upload_int4(const Int4HostWeight& w);

  void linear(T* y, const T* x, const T* w, int m, int n, int k, Accumulate mode, float alpha = 1.0f);
  void linear_dgrad(T* dx, const T* dy, const T* w, int m, int n, int k, Accumulate mode, float alpha = 1.0f);
  void linear_wgrad(float* dw, const T* dy, const T* x, int m, int n, int k);
  void int4_linear(T* y, const T* x, const Int4Weight& w, int m, Accumulate mode);
  void int4_linear_dgrad(T* dx, const T* dy, const Int4Weight& w, int m, Accumulate mode);

  void embedding(const EmbeddingArgs<T>& a) { cuda::embedding_forward(a, stream_); }
  void embedding_backward(const EmbeddingBackwardArgs<T>& a) { cuda::embedding_backward(a, stream_); }
  void rmsnorm(const RmsNormArgs<T>& a) { cuda::rmsnorm_forward(a, stream_); }
  void rmsnorm_backward(const RmsNormBackwardArgs<T>& a) { cuda::rmsnorm_backward(a, stream_); }
  void rope(const RopeArgs<T>& a) { cuda::rope_forward(a, stream_); }
  void rope_backward(const RopeArgs<T>& a) { cuda::rope_backward(a, stream_); }
  void attention(const AttentionArgs<T>& a) { cuda::attention_forward(a, stream_); }
  void attention_backward(const AttentionBackwardArgs<T>& a) { cuda::attention_backward(a, stream_); }
  void swiglu(const SwigluArgs<T>& a) { cuda::swiglu_forward(a, stream_); }
  void swiglu_backward(const SwigluBackwardArgs<T>& a) { cuda::swiglu_backward(a, stream_); }
  void softmax_loss(const SoftmaxLossArgs<T>& a) { cuda::softmax_loss(a, stream_); }
  void l2norm(const L2NormArgs<T>& a) { cuda::l2norm_forward(a, stream_); }
  void l2norm_backward(const L2NormBackwardArgs<T>& a) { cuda::l2norm_backward(a, stream_); }
  void fake_quant(const FakeQuantArgs<T>& a) { cuda::fake_quant_forward(a, stream_); }
  void fake_quant_backward(const FakeQuantBackwardArgs& a) { cuda::fake_quant_backward(a, stream_); }
  void adamw(const AdamWArgs& a) { cuda::adamw_update(a, stream_); }
  double sum_squares(const float* x, int64_t n);
  int64_t rmsnorm_scratch(int rows, int dim) const { return cuda::rmsnorm_backward_scratch_floats(rows, dim); }
  int64_t attention_scratch(int batch, int seq, int heads, int kv_heads, int head_dim) const {
    return cuda::attention_backward_scratch_floats(batch, seq, heads, kv_heads, head_dim);
  }

  cudaStream_t stream() const { return stream_; }

 private:
  void copy_bytes(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
  void zero_bytes(void* p, size_t bytes);
  // The frozen layers' products with m >= kDequantMinRows: the weight is dequantized here, then cuBLASLt.
  const T* dequantized(const Int4Weight& w);

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<CublasLt> lt_;
  std::vector<void*> owned_;
  float* sumsq_ = nullptr;          // [1 + kSumSquaresBlocks]
  int64_t int4_max_elems_ = 0;      // the largest int4 weight uploaded, n * k
  T* dq_ = nullptr;                 // [dq_elems_] bf16 scratch, allocated on first use
  int64_t dq_elems_ = 0;
};

}  // namespace qkd::train
