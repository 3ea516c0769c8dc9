#include "train/ops.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/cuda_check.h"
#include "kernels/error.h"
#include "kernels/int4_dequant.h"
#include "kernels/int4_gemm.h"

namespace qkd::train {

// ------------------------------------------------------------------------------------------------------ CPU

namespace {
// A copy of an int4 weight in the backend's memory, and its view.
template <class Ops>
Int4Weight upload_int4_copy(Ops& ops, const Int4HostWeight& w) {
  auto put = [&](const auto& v) {
    using U = typename std::decay_t<decltype(v)>::value_type;
    U* p = ops.template alloc<U>(static_cast<int64_t>(v.size()));
    ops.upload(p, v.data(), static_cast<int64_t>(v.size()));
    return p;
  };
  const uint32_t* packed = put(w.packed);
  const uint16_t* scales = put(w.scales);
  const uint16_t* mins = w.mins.empty() ? nullptr : put(w.mins);
  return {packed, scales, mins, w.n, w.k, w.group_size, w.sym, w.scale_type};
}
}  // namespace

Int4Weight CpuOps::upload_int4(const Int4HostWeight& w) { return upload_int4_copy(*this, w); }

namespace {
// y (=|+=) alpha * t, for the rare alpha != 1 products (the contrastive loss's 1 / temperature).
void scaled_store(float* y, const std::vector<float>& t, float alpha, Accumulate mode) {
  for (size_t i = 0; i < t.size(); ++i) y[i] = mode == Accumulate::Add ? y[i] + alpha * t[i] : alpha * t[i];
}
}  // namespace

void CpuOps::linear(T* y, const T* x, const T* w, int m, int n, int k, Accumulate mode, float alpha) {
  if (alpha == 1.0f) return cpu::matmul_forward({y, x, w, m, n, k, mode});
  std::vector<float> t(static_cast<size_t>(m) * n);
  cpu::matmul_forward({t.data(), x, w, m, n, k, Accumulate::Overwrite});
  scaled_store(y, t, alpha, mode);
}

void CpuOps::linear_dgrad(T* dx, const T* dy, const T* w, int m, int n, int k, Accumulate mode, float alpha) {
  if (alpha == 1.0f) return cpu::matmul_backward_data({dx, dy, w, m, n, k, mode});
  std::vector<float> t(static_cast<size_t>(m) * k);
  cpu::matmul_backward_data({t.data(), dy, w, m, n, k, Accumulate::Overwrite});
  scaled_store(dx, t, alpha, mode);
}

void CpuOps::linear_wgrad(float* dw, const T* dy, const T* x, int m, int n, int k) {
  cpu::matmul_backward_weight({dw, dy, x, m, n, k, Accumulate::Add});
}

void CpuOps::int4_linear(T* y, const T* x, const Int4Weight& w, int m, Accumulate mode) {
  cpu::int4_gemm_forward({y, x, w, m, mode});
}

void CpuOps::int4_linear_dgrad(T* dx, const T* dy, const Int4Weight& w, int m, Accumulate mode) {
  cpu::int4_gemm_backward({dx, dy, w, m, mode});
}

// ----------------------------------------------------------------------------------------------------- CUDA

CudaOps::CudaOps() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  QKD_CHECK(err == cudaSuccess && n > 0, "the CUDA backend needs a GPU, and none is available ({})",
            err == cudaSuccess ? "no device" : cudaGetErrorString(err));
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  lt_ = std::make_unique<CublasLt>();
  sumsq_ = alloc<float>(1 + kSumSquaresBlocks);
}

CudaOps::~CudaOps() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  lt_.reset();
  for (void* p : owned_) cudaFree(p);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void* CudaOps::alloc_bytes(size_t bytes) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky allocation error so later calls report their own
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("the GPU cannot hold the training buffers: a buffer of {} bytes was asked for with {} bytes free of {} "
         "({}); lower --batch or --seq-len, or use --micro-batch",
         bytes, free_b, total_b, cudaGetErrorString(err));
  }
  owned_.push_back(p);
  CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
  return p;
}

void CudaOps::copy_bytes(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, stream_));
  if (kind == cudaMemcpyDeviceToHost) CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::zero_bytes(void* p, size_t bytes) { CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_)); }

void CudaOps::sync() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

Int4Weight CudaOps::upload_int4(const Int4HostWeight& w) {
  int4_max_elems_ = std::max(int4_max_elems_, int64_t{w.n} * w.k);
  const Int4Weight v = upload_int4_copy(*this, w);
  sync();  // the host copies may go away once this returns
  return v;
}

void CudaOps::to_compute(T* dst, const float* host_src, int64_t n) {
  // Only at set-up and after a checkpoint is loaded (AdamW writes the bf16 copy on every step). Rounded on the
  // host with the same nearest-even rule as the device.
  std::vector<__nv_bfloat16> b(static_cast<size_t>(n));
  for (size_t i = 0; i < b.size(); ++i) b[i] = __float2bfloat16_rn(host_src[i]);
  upload(dst, b.data(), n);
  sync();
}

void CudaOps::linear(T* y, const T* x, const T* w, int m, int n, int k, Accumulate mode, float alpha) {
  GemmArgs g{y, x, w, m, n, k, Transpose::No, Transpose::Yes, GemmOut::BF16, mode, alpha};
  cuda::gemm(*lt_, g, stream_);
}

void CudaOps::linear_dgrad(T* dx, const T* dy, const T* w, int m, int n, int k, Accumulate mode, float alpha) {
  GemmArgs g{dx, dy, w, m, k, n, Transpose::No, Transpose::No, GemmOut::BF16, mode, alpha};
  cuda::gemm(*lt_, g, stream_);
}

void CudaOps::linear_wgrad(float* dw, const T* dy, const T* x, int m, int n, int k) {
  GemmArgs g{dw, dy, x, n, k, m, Transpose::Yes, Transpose::No, GemmOut::F32, Accumulate::Add, 1.0f};
  cuda::gemm(*lt_, g, stream_);
}

// A training micro-batch has hundreds to thousands of rows, where the fused int4 GEMM runs at about a third of
// cuBLASLt's rate; the frozen weight is dequantized into one bf16 scratch (the kernels' own rounding, so the
// product sees the operands the fused GEMM would) right before each product, on the same stream. That costs
// 2.5 bytes a weight (16 MiB for a 4096 x 4096 o_proj, microseconds) against a GEMM of m x n x k, and the
// packed int4 stays the only stored copy of the weight.
const CudaOps::T* CudaOps::dequantized(const Int4Weight& w) {
  const int64_t need = std::max(int4_max_elems_, int64_t{w.n} * w.k);  // sized once for every uploaded weight
  if (need > dq_elems_) {
    dq_ = alloc<T>(need);
    dq_elems_ = need;
  }
  cuda::int4_dequantize({dq_, w}, stream_);
  return dq_;
}

void CudaOps::int4_linear(T* y, const T* x, const Int4Weight& w, int m, Accumulate mode) {
  if (m >= kDequantMinRows) return linear(y, x, dequantized(w), m, w.n, w.k, mode);
  cuda::int4_gemm_forward({y, x, w, m, mode}, stream_);
}

void CudaOps::int4_linear_dgrad(T* dx, const T* dy, const Int4Weight& w, int m, Accumulate mode) {
  if (m >= kDequantMinRows) return linear_dgrad(dx, dy, dequantized(w), m, w.n, w.k, mode);
  cuda::int4_gemm_backward({dx, dy, w, m, mode}, stream_);
}

double CudaOps::sum_squares(const float* x, int64_t n) {
  cuda::sum_squares({sumsq_, x, n, sumsq_ + 1}, stream_);
  float out = 0.0f;
  download(&out, sumsq_, 1);
  return out;
}

}  // namespace qkd::train
