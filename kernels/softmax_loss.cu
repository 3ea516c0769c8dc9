// CUDA fused cross-entropy and temperature KL over the vocabulary (kernels/softmax_loss.h), bf16 logits, fp32 math.
//   ce[r] = lse(z) - z[y]                                   (0 when y < 0 or no targets; overwritten)
//   kl[r] = tau^2 sum_i p_t[i] (log p_t[i] - log p_s[i])     p_t = softmax(t / tau), p_s = softmax(z / tau)
//   dz    = grad_scale (ce_weight (softmax(z) - onehot(y)) + kl_weight tau (p_s - p_t))   (overwrites z)
// One block per row (a row of 128k bf16 logits is 256 KB, too much to keep on chip), two passes over it:
//   1. online softmax statistics: each thread keeps running maxima and sums of exponentials (student at 1 and at
//      tau, teacher at tau), rescaling its sums when its maximum grows, and the block merges the threads' states
//      in a fixed tree;
//   2. the gradient, written over the logits, and the KL terms, formed from the normalised log-probabilities so
//      that KL is exactly 0 when teacher == student.
// Threads read 8 consecutive logits at a time, with one 16-byte load when rows are 16-byte aligned (ld % 8 == 0)
// and with 8 scalar loads otherwise. Exponentials use __expf: its error (about 2 ulp near the maximum, where the
// terms that matter are) is far below the bf16 rounding of dz. A target >= vocab is a caller's bug the kernel
// cannot throw for: that row's ce and dz become NaN, which the trainer's finiteness check reports.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/bf16x8.cuh"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_check.h"
#include "kernels/softmax_loss.h"

namespace qkd::cuda {

namespace {

constexpr int kMaxThreads = 1024;

// A thread's (or a group of threads') softmax statistics: running maxima and the sums of exp(x - max).
struct Stats {
  float mz, sz, szs;  // student: max of z, sum exp(z - mz), sum exp(z / tau - mz / tau)
  float mt, st;       // teacher: max of t, sum exp(t / tau - mt / tau)
};

// s * exp((m_old - m_new) * scale): the rescaling of a running sum whose maximum grew (or of one side of a
// merge). A side that has seen nothing (m_old = -inf) contributes 0, even when m_new is -inf too.
__device__ __forceinline__ float rescale(float s, float m_old, float m_new, float scale) {
  return m_old == -INFINITY ? 0.0f : s * __expf((m_old - m_new) * scale);
}

// The merge of two states: symmetric in its operands bit for bit (max and + are commutative), so the xor
// butterfly leaves every lane with the same state.
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b, float inv_tau) {
  Stats c;
  c.mz = fmaxf(a.mz, b.mz);
  c.sz = rescale(a.sz, a.mz, c.mz, 1.0f) + rescale(b.sz, b.mz, c.mz, 1.0f);
  c.szs = rescale(a.szs, a.mz, c.mz, inv_tau) + rescale(b.szs, b.mz, c.mz, inv_tau);
  c.mt = fmaxf(a.mt, b.mt);
  c.st = rescale(a.st, a.mt, c.mt, inv_tau) + rescale(b.st, b.mt, c.mt, inv_tau);
  return c;
}

__device__ __forceinline__ Stats shfl_xor(const Stats& s, int o) {
  return {__shfl_xor_sync(0xffffffffu, s.mz, o), __shfl_xor_sync(0xffffffffu, s.sz, o),
          __shfl_xor_sync(0xffffffffu, s.szs, o), __shfl_xor_sync(0xffffffffu, s.mt, o),
          __shfl_xor_sync(0xffffffffu, s.st, o)};
}

// The block's merged state, in every thread: a warp butterfly, then the warps' states in warp order.
__device__ Stats block_merge(Stats s, float inv_tau, Stats* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = merge(s, shfl_xor(s, o), inv_tau);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : Stats{-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = merge(s, shfl_xor(s, o), inv_tau);
  return s;
}

// 8 logits from i0 on (fewer at the end of the row; the missing ones read as `pad`). Returns how many are real.
template <bool VEC>
__device__ __forceinline__ int load8(const __nv_bfloat16* row, int i0, int vocab, float pad, float (&f)[kBf16x8]) {
  const int count = min(kBf16x8, vocab - i0);
  if (VEC && count == kBf16x8) {
    bf16x8_to_float(*reinterpret_cast<const uint4*>(row + i0), f);
  } else {
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) f[j] = j < count ? __bfloat162float(row[i0 + j]) : pad;
  }
  return count;
}

template <bool VEC>
__device__ __forceinline__ void store8(__nv_bfloat16* row, int i0, int count, const float (&f)[kBf16x8]) {
  if (VEC && count == kBf16x8) {
    *reinterpret_cast<uint4*>(row + i0) = float_to_bf16x8(f);
  } else {
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) {
      if (j < count) row[i0 + j] = __float2bfloat16_rn(f[j]);
    }
  }
}

// log softmax(x / tau) = (x - max) / tau - log sum exp((x_i - max) / tau): the exponent of pass 1's terms, so
// the probabilities sum to 1 whatever the logits' offset (x - max is exact for nearby bf16 values). One function
// for student and teacher, so that equal logits give bit-equal log-probabilities (and a KL of exactly 0).
__device__ __forceinline__ float log_prob(float x, float max, float inv_tau, float log_sum) {
  return (x - max) * inv_tau - log_sum;
}

struct LossParams {
  int vocab;
  int64_t ld;
  float tau, inv_tau, kl_scale;  // kl_scale = tau^2
  float ce_coef, kl_coef;         // grad_scale * ce_weight, grad_scale * kl_weight * tau
  bool use_tau, write_grad, second_pass;
};

}  // namespace

template <bool VEC>
static __global__ void __launch_bounds__(kMaxThreads)
    softmax_loss_kernel(__nv_bfloat16* logits, const __nv_bfloat16* teacher, const int32_t* targets, float* ce,
                        float* kl, LossParams p) {
  __shared__ Stats s_stats[32];
  __shared__ float s_red[32];
  __nv_bfloat16* z = logits + static_cast<int64_t>(blockIdx.x) * p.ld;
  const __nv_bfloat16* t = teacher != nullptr ? teacher + static_cast<int64_t>(blockIdx.x) * p.ld : nullptr;
  const int y = targets != nullptr ? targets[blockIdx.x] : -1;
  const bool bad_target = y >= p.vocab;
  // Read before the first barrier: after it, other threads start overwriting the row with its gradient.
  const float z_target = threadIdx.x == 0 && y >= 0 && !bad_target ? __bfloat162float(z[y]) : 0.0f;
  const int stride = blockDim.x * kBf16x8;

  // 1. statistics
  Stats st{-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f};
  for (int i0 = threadIdx.x * kBf16x8; i0 < p.vocab; i0 += stride) {
    float zf[kBf16x8];
    load8<VEC>(z, i0, p.vocab, -INFINITY, zf);
    float cm = zf[0];
#pragma unroll
    for (int j = 1; j < kBf16x8; ++j) cm = fmaxf(cm, zf[j]);
    const float m = fmaxf(st.mz, cm);
    st.sz = rescale(st.sz, st.mz, m, 1.0f);
    if (p.use_tau) st.szs = rescale(st.szs, st.mz, m, p.inv_tau);
    st.mz = m;
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) {
      st.sz += __expf(zf[j] - m);  // a pad of -inf adds exp(-inf) = 0
      if (p.use_tau) st.szs += __expf((zf[j] - m) * p.inv_tau);
    }
    if (t != nullptr) {
      float tf[kBf16x8];
      load8<VEC>(t, i0, p.vocab, -INFINITY, tf);
      float tm = tf[0];
#pragma unroll
      for (int j = 1; j < kBf16x8; ++j) tm = fmaxf(tm, tf[j]);
      const float mt = fmaxf(st.mt, tm);
      st.st = rescale(st.st, st.mt, mt, p.inv_tau);
      st.mt = mt;
#pragma unroll
      for (int j = 0; j < kBf16x8; ++j) st.st += __expf((tf[j] - mt) * p.inv_tau);
    }
  }
  st = block_merge(st, p.inv_tau, s_stats);
  if (!p.use_tau) st.szs = st.sz;
  const float log_szs = logf(st.szs), log_st = logf(st.st);
  const float inv_sz = 1.0f / st.sz;
  if (threadIdx.x == 0 && ce != nullptr) {
    ce[blockIdx.x] = bad_target ? NAN : (y >= 0 ? (st.mz + logf(st.sz)) - z_target : 0.0f);
  }
  if (!p.second_pass) return;  // block-uniform: no barrier is skipped by part of the block

  // 2. gradient and KL
  const float ce_coef = y >= 0 ? p.ce_coef : 0.0f;
  float kl_acc = 0.0f;
  for (int i0 = threadIdx.x * kBf16x8; i0 < p.vocab; i0 += stride) {
    float zf[kBf16x8], tf[kBf16x8];
    const int count = load8<VEC>(z, i0, p.vocab, 0.0f, zf);
    if (t != nullptr) load8<VEC>(t, i0, p.vocab, 0.0f, tf);
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) {
      float d = 0.0f;
      if (y >= 0) d = ce_coef * (__expf(zf[j] - st.mz) * inv_sz - (i0 + j == y ? 1.0f : 0.0f));
      if (t != nullptr && j < count) {
        const float log_ps = log_prob(zf[j], st.mz, p.inv_tau, log_szs);
        const float log_pt = log_prob(tf[j], st.mt, p.inv_tau, log_st);
        const float pt = __expf(log_pt);
        if (pt > 0.0f) kl_acc += pt * (log_pt - log_ps);
        d += p.kl_coef * (__expf(log_ps) - pt);
      }
      zf[j] = bad_target ? NAN : d;
    }
    if (p.write_grad) store8<VEC>(z, i0, count, zf);
  }
  if (kl != nullptr) {
    const float total = block_sum(kl_acc, s_red);
    if (threadIdx.x == 0) kl[blockIdx.x] = t != nullptr ? p.kl_scale * total : 0.0f;
  }
}

void softmax_loss(const SoftmaxLossArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.rows >= 0, "softmax_loss: rows {} is negative", a.rows);
  QKD_CHECK(a.vocab > 0, "softmax_loss: vocab {} must be positive", a.vocab);
  QKD_CHECK(a.ld >= a.vocab, "softmax_loss: ld {} is below vocab {}", a.ld, a.vocab);
  QKD_CHECK(a.temperature > 0.0f && std::isfinite(a.temperature), "softmax_loss: temperature {} must be positive",
            a.temperature);
  QKD_CHECK(a.logits != nullptr || a.rows == 0, "softmax_loss: logits is null");
  if (a.rows == 0) return;
  LossParams p;
  p.vocab = a.vocab;
  p.ld = a.ld;
  p.tau = a.temperature;
  p.inv_tau = 1.0f / a.temperature;
  p.kl_scale = a.temperature * a.temperature;
  p.ce_coef = a.grad_scale * a.ce_weight;
  p.kl_coef = a.grad_scale * a.kl_weight * a.temperature;
  p.use_tau = a.temperature != 1.0f;
  p.write_grad = a.grad == LossGrad::Write;
  p.second_pass = p.write_grad || (a.kl != nullptr && a.teacher != nullptr);
  // The KL output of a row without a teacher is 0; the pass 2 that would write it is skipped when nothing else
  // needs it, so write the zeros here.
  if (a.kl != nullptr && !p.second_pass) CUDA_CHECK(cudaMemsetAsync(a.kl, 0, sizeof(float) * a.rows, stream));
  const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = a.ld % kBf16x8 == 0 && aligned(a.logits) && (a.teacher == nullptr || aligned(a.teacher));
  // Enough threads for one sweep of 8 logits each, up to the cap; a multiple of 32 for the reductions.
  const int64_t chunks = (a.vocab + kBf16x8 - 1) / kBf16x8;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (chunks + 31) / 32 * 32));
  if (vec) {
    softmax_loss_kernel<true><<<a.rows, threads, 0, stream>>>(a.logits, a.teacher, a.targets, a.ce, a.kl, p);
  } else {
    softmax_loss_kernel<false><<<a.rows, threads, 0, stream>>>(a.logits, a.teacher, a.targets, a.ce, a.kl, p);
  }
  KERNEL_CHECK();
}

}  // namespace qkd::cuda
