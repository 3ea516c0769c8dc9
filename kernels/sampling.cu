// CUDA next-token selection (kernels/sampling.h): greedy argmax, or temperature + top-k + top-p sampling by the
// exact rule written out in the header.
//   tokens[b] = the token chosen for row b                                              (tokens overwritten)
// One CTA of 1024 threads per row: a decode step samples one to a few rows, so a row's whole selection runs in
// one CTA with no workspace and no second launch, and the step stays capturable in a CUDA graph.
//   argmax:  a block-wide max of sampling_rank (rank key and index in one integer).
//   sample:  radix select of the top_k largest ranks (8 bits a pass from the top, stopping once the boundary
//            bucket is taken whole), gather of the pool into shared memory, bitonic sort, integer weights, one
//            block-wide scan, and two parallel searches over the prefix sums (nucleus cut, then the draw).
// Integer weights make every sum exact, so the block-wide scan gives the twin's sequential sums bit for bit.
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/sampling.h"

namespace qkd::cuda {

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kSamplingMaxTopK <= kThreads, "the scan gives each pool slot one thread");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

template <typename T>
static __global__ void __launch_bounds__(kThreads)
    sampling_argmax_kernel(int32_t* tokens, const T* logits, int vocab_size, int64_t ld) {
  __shared__ uint64_t s_warp[kWarps];
  const T* row = logits + blockIdx.x * ld;
  uint64_t best = 0;  // below every real rank
  for (int i = threadIdx.x; i < vocab_size; i += kThreads) {
    const uint64_t r = sampling_rank(to_float(row[i]), i);
    best = r > best ? r : best;
  }
  best = warp_max(best);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    best = warp_max(s_warp[threadIdx.x]);
    if (threadIdx.x == 0) tokens[blockIdx.x] = sampling_rank_index(best);
  }
}

template <typename T>
static __global__ void __launch_bounds__(kThreads)
    sampling_sample_kernel(int32_t* tokens, const T* logits, const float* uniform, int vocab_size, int64_t ld,
                           float temperature, int top_k, float top_p) {
  __shared__ uint32_t s_hist[256];
  __shared__ uint64_t s_pool[kSamplingMaxTopK];  // the pool's ranks, sorted descending
  __shared__ uint64_t s_cum[kSamplingMaxTopK];   // prefix sums of the weights
  __shared__ uint64_t s_warp[kWarps];
  __shared__ int s_digit, s_need, s_bucket, s_count, s_nucleus;
  __shared__ float s_z0;

  const T* row = logits + blockIdx.x * ld;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int pool = min(top_k, vocab_size);

  // 1. Radix select: after the pass on bits [shift, shift + 8), the ranks above `prefix` (on the bits in `mask`)
  //    are all in the pool, and `need` more come from the bucket equal to it.
  uint64_t prefix = 0, mask = 0;
  int need = pool;
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (tid < 256) s_hist[tid] = 0;
    __syncthreads();
    for (int base = 0; base < vocab_size; base += kThreads) {
      const int i = base + tid;
      bool hit = false;
      uint64_t rank = 0;
      if (i < vocab_size) {
        rank = sampling_rank(to_float(row[i]), i);
        hit = (rank & mask) == prefix;
      }
      // Logits crowd into a few buckets (the top bits hold sign and exponent): one atomic per distinct bucket
      // per warp instead of one per lane.
      const unsigned bin = hit ? static_cast<unsigned>(rank >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (hit && __ffs(peers) - 1 == lane) atomicAdd(&s_hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds bins 255 - 8l down to 248 - 8l: a scan over lanes counts from the top bucket down.
      uint32_t c[8], sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = s_hist[255 - 8 * lane - e];
        sum += c[e];
      }
      uint32_t incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      uint32_t above = incl - sum;
      if (above < static_cast<uint32_t>(need) && static_cast<uint32_t>(need) <= incl) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (above + c[e] >= static_cast<uint32_t>(need)) {
            s_digit = 255 - 8 * lane - e;
            s_need = need - static_cast<int>(above);
            s_bucket = static_cast<int>(c[e]);
            break;
          }
          above += c[e];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(s_digit) << shift;
    mask |= uint64_t{0xff} << shift;
    need = s_need;
    const bool whole_bucket = s_bucket == need;
    __syncthreads();  // s_hist and s_digit are rewritten by the next pass
    if (whole_bucket) break;
  }

  // 2. Gather: exactly `pool` ranks have (rank & mask) >= prefix.
  if (tid == 0) s_count = 0;
  __syncthreads();
  for (int base = 0; base < vocab_size; base += kThreads) {
    const int i = base + tid;
    uint64_t rank = 0;
    bool in = false;
    if (i < vocab_size) {
      rank = sampling_rank(to_float(row[i]), i);
      in = (rank & mask) >= prefix;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    int slot = 0;
    if (lane == 0 && ballot != 0) slot = atomicAdd(&s_count, __popc(ballot));
    slot = __shfl_sync(0xffffffffu, slot, 0);
    if (in) s_pool[slot + __popc(ballot & ((1u << lane) - 1u))] = rank;
  }
  int padded = 1;
  while (padded < pool) padded *= 2;
  if (tid >= pool && tid < padded) s_pool[tid] = 0;  // below every real rank: sorts last
  __syncthreads();

  // 3. Bitonic sort, descending.
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const int j = tid ^ stride;
      if (tid < padded && j > tid) {
        const uint64_t x = s_pool[tid], y = s_pool[j];
        const bool descending = (tid & size) == 0;
        if (descending ? x < y : x > y) {
          s_pool[tid] = y;
          s_pool[j] = x;
        }
      }
      __syncthreads();
    }
  }

  // 4. Weights. __fdiv_rn / __fsub_rn pin the IEEE rounding the rule (and the twin) uses, whatever the flags.
  if (tid == 0) s_z0 = __fdiv_rn(to_float(row[sampling_rank_index(s_pool[0])]), temperature);
  __syncthreads();
  const float z0 = s_z0;
  if (!isfinite(z0)) {
    if (tid == 0) tokens[blockIdx.x] = sampling_rank_index(s_pool[0]);
    return;
  }
  uint64_t w = 0;
  if (tid < pool) {
    const float z = __fdiv_rn(to_float(row[sampling_rank_index(s_pool[tid])]), temperature);
    w = sampling_weight(__fsub_rn(z, z0));
  }

  // 5. Inclusive scan of the weights (integers: exact in any order).
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += n;
  }
  if (lane == 31) s_warp[warp] = w;
  __syncthreads();
  if (warp == 0) {
    uint64_t t = s_warp[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t n = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += n;
    }
    s_warp[lane] = t;
  }
  __syncthreads();
  if (warp > 0) w += s_warp[warp - 1];
  s_cum[tid] = w;
  if (tid == 0) s_nucleus = pool;
  __syncthreads();

  // 6. Nucleus: the first prefix whose mass reaches ceil(top_p * total). 7. The draw inside it.
  if (top_p < 1.0f) {
    const uint64_t threshold = sampling_nucleus_threshold(top_p, s_cum[pool - 1]);
    if (tid < pool && s_cum[tid] >= threshold && (tid == 0 || s_cum[tid - 1] < threshold)) s_nucleus = tid + 1;
    __syncthreads();
  }
  const int nucleus = s_nucleus;
  const uint64_t target = sampling_target(uniform[blockIdx.x], s_cum[nucleus - 1]);
  if (tid < nucleus && s_cum[tid] > target && (tid == 0 || s_cum[tid - 1] <= target)) {
    tokens[blockIdx.x] = sampling_rank_index(s_pool[tid]);
  }
}

template <typename T>
static void sampling_forward_impl(const SamplingArgs<T>& a, cudaStream_t stream) {
  const bool greedy = sampling_check(a.batch, a.vocab_size, a.ld, a.temperature, a.top_k, a.top_p);
  if (a.batch == 0) return;
  QKD_CHECK(a.tokens != nullptr && a.logits != nullptr, "sampling_forward: tokens / logits is null");
  if (greedy) {
    sampling_argmax_kernel<T><<<a.batch, kThreads, 0, stream>>>(a.tokens, a.logits, a.vocab_size, a.ld);
  } else {
    QKD_CHECK(a.uniform != nullptr, "sampling_forward: uniform is null with temperature {}", a.temperature);
    sampling_sample_kernel<T><<<a.batch, kThreads, 0, stream>>>(a.tokens, a.logits, a.uniform, a.vocab_size, a.ld,
                                                                a.temperature, a.top_k, a.top_p);
  }
  KERNEL_CHECK();
}

void sampling_forward(const SamplingArgs<float>& a, cudaStream_t stream) { sampling_forward_impl(a, stream); }

void sampling_forward(const SamplingArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  sampling_forward_impl(a, stream);
}

}  // namespace qkd::cuda
