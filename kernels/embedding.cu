// CUDA embedding gather and its scatter-add backward (kernels/embedding.h).
//   forward:  out[t, :] = table[tokens[t], :]             (out overwritten)
//   backward: dtable[tokens[t], :] += dout[t, :]          (accumulates, fp32)
// forward: a pure copy, one block per token row, 16-byte accesses.
// backward, deterministic without atomics or scratch: block (bucket, column slice) owns the table rows whose id is
// congruent to `bucket` modulo the number of buckets, in its slice of columns, so no two blocks write the same
// element. It scans the tokens in windows of kWindow; per window it gathers its matching tokens in token order,
// sorts them by id (stably, so each id's tokens stay in token order), and for each id adds the sum of its dout
// rows, taken in token order, to the table row. The result depends only on the tokens and kWindow, not on the
// bucket count or the grid.
#include <algorithm>
#include <cstdint>

#include "kernels/bf16x8.cuh"
#include "kernels/cuda_check.h"
#include "kernels/embedding.h"

namespace qkd::cuda {

// ---------------------------------------------------------------------------------------------------- forward

// Ids are validated by the runtime (embedding.h); an id that slips through anyway fills its row with NaN, so the
// mistake shows up in the logits instead of as a read outside the table.
static __global__ void embedding_forward_kernel(uint4* out, const uint4* table, const int32_t* tokens,
                                                int vecs_per_row, int vocab_size) {
  const int t = blockIdx.x;
  const int32_t token = tokens[t];
  uint4* dst = out + static_cast<int64_t>(t) * vecs_per_row;
  if (token < 0 || token >= vocab_size) {
    const uint32_t nan2 = 0x7fc07fc0u;  // two bf16 quiet NaNs
    for (int i = threadIdx.x; i < vecs_per_row; i += blockDim.x) dst[i] = make_uint4(nan2, nan2, nan2, nan2);
    return;
  }
  const uint4* src = table + static_cast<int64_t>(token) * vecs_per_row;
  for (int i = threadIdx.x; i < vecs_per_row; i += blockDim.x) dst[i] = src[i];
}

void embedding_forward(const EmbeddingArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.n_tokens >= 0, "embedding_forward: n_tokens {} is negative", a.n_tokens);
  QKD_CHECK(a.dim > 0 && a.vocab_size > 0, "embedding_forward: dim {} and vocab_size {} must be positive", a.dim,
            a.vocab_size);
  // 16-byte accesses move 8 bf16 at a time; every LLaMA-family width is a multiple of 8.
  QKD_CHECK(a.dim % 8 == 0, "embedding_forward: dim {} is not a multiple of 8", a.dim);
  QKD_CHECK(reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && reinterpret_cast<uintptr_t>(a.table) % 16 == 0,
            "embedding_forward: out {} / table {} are not 16-byte aligned", static_cast<const void*>(a.out),
            static_cast<const void*>(a.table));
  if (a.n_tokens == 0) return;
  QKD_CHECK(a.tokens != nullptr, "embedding_forward: tokens is null with n_tokens {}", a.n_tokens);
  const int vecs = a.dim / 8;
  const int threads = vecs >= 256 ? 256 : (vecs + 31) / 32 * 32;
  embedding_forward_kernel<<<a.n_tokens, threads, 0, stream>>>(reinterpret_cast<uint4*>(a.out),
                                                               reinterpret_cast<const uint4*>(a.table), a.tokens,
                                                               vecs, a.vocab_size);
  KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------------------- backward

namespace {

constexpr int kBackwardThreads = 128;
constexpr int kTokensPerThread = 8;
constexpr int kWindow = kBackwardThreads * kTokensPerThread;  // tokens scanned per pass; the match list's capacity
constexpr int kColsPerBlock = kBackwardThreads * 8;           // each thread owns one 8-column (16-byte dout) slice
// Blocks to aim for: enough for every SM to stream dout rows; each block rescans the token ids (4 bytes a token,
// from L2), which stays small next to the dout rows it reads.
constexpr int kTargetBlocks = 1024;
// dout rows of one id loaded back to back before they are summed: independent loads overlap their latency.
constexpr int kLoadBatch = 8;

}  // namespace

static __global__ void __launch_bounds__(kBackwardThreads)
    embedding_backward_kernel(float* dtable, const uint4* dout, const int32_t* tokens, int n_tokens, int dim,
                              int vocab_size, int n_buckets) {
  __shared__ int32_t s_tok[kWindow], s_id[kWindow];              // this block's matches, in token order
  __shared__ int32_t s_sorted_tok[kWindow], s_sorted_id[kWindow];  // the same, sorted by id, stable
  __shared__ int s_warp_count[kBackwardThreads / 32];
  const int bucket = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int col = blockIdx.y * kColsPerBlock + tid * 8;  // this thread's first column
  const int vecs_per_row = dim / 8;

  for (int base = 0; base < n_tokens; base += kWindow) {
    // Gather: thread tid checks tokens base + 8 tid .. + 7, so a prefix sum over threads keeps token order.
    int32_t ids[kTokensPerThread];
    int count = 0;
#pragma unroll
    for (int e = 0; e < kTokensPerThread; ++e) {
      const int t = base + tid * kTokensPerThread + e;
      const int32_t id = t < n_tokens ? tokens[t] : -1;
      // Ids are validated by the runtime; one outside the table is skipped rather than written out of bounds.
      const bool match = id >= 0 && id < vocab_size && id % n_buckets == bucket;
      ids[e] = match ? id : -1;
      count += match;
    }
    int incl = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane == 31) s_warp_count[warp] = incl;
    __syncthreads();
    int offset = incl - count, total = 0;
#pragma unroll
    for (int w = 0; w < kBackwardThreads / 32; ++w) {
      const int c = s_warp_count[w];
      offset += w < warp ? c : 0;
      total += c;
    }
#pragma unroll
    for (int e = 0; e < kTokensPerThread; ++e) {
      if (ids[e] >= 0) {
        s_tok[offset] = base + tid * kTokensPerThread + e;
        s_id[offset] = ids[e];
        ++offset;
      }
    }
    __syncthreads();
    if (total > 0) {  // uniform: every thread read the same counts
      // Stable sort by id: an entry's rank is the number of entries with a smaller id, or the same id and an
      // earlier token. Quadratic in the matches, which number about kWindow / n_buckets.
      for (int i = tid; i < total; i += kBackwardThreads) {
        const int32_t id = s_id[i];
        int rank = 0;
        for (int j = 0; j < total; ++j) {
          const int32_t other = s_id[j];
          rank += other < id || (other == id && j < i);
        }
        s_sorted_tok[rank] = s_tok[i];
        s_sorted_id[rank] = id;
      }
      __syncthreads();
      if (col < dim) {
        const int v = col / 8;
        for (int s = 0; s < total;) {
          const int32_t id = s_sorted_id[s];
          int end = s + 1;
          while (end < total && s_sorted_id[end] == id) ++end;
          float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
          for (; s < end; s += kLoadBatch) {
            uint4 rows[kLoadBatch];
#pragma unroll
            for (int k = 0; k < kLoadBatch; ++k) {
              if (s + k < end) rows[k] = dout[static_cast<int64_t>(s_sorted_tok[s + k]) * vecs_per_row + v];
            }
#pragma unroll
            for (int k = 0; k < kLoadBatch; ++k) {
              if (s + k < end) {  // token order within the id
                float f[kBf16x8];
                bf16x8_to_float(rows[k], f);
#pragma unroll
                for (int e = 0; e < kBf16x8; ++e) acc[e] += f[e];
              }
            }
          }
          s = end;
          float4* dst = reinterpret_cast<float4*>(dtable + static_cast<int64_t>(id) * dim + col);
          float4 lo = dst[0], hi = dst[1];
          lo.x += acc[0];
          lo.y += acc[1];
          lo.z += acc[2];
          lo.w += acc[3];
          hi.x += acc[4];
          hi.y += acc[5];
          hi.z += acc[6];
          hi.w += acc[7];
          dst[0] = lo;
          dst[1] = hi;
        }
      }
    }
    __syncthreads();  // the next window overwrites the match lists and the warp counts
  }
}

void embedding_backward(const EmbeddingBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.n_tokens >= 0, "embedding_backward: n_tokens {} is negative", a.n_tokens);
  QKD_CHECK(a.dim > 0 && a.vocab_size > 0, "embedding_backward: dim {} and vocab_size {} must be positive", a.dim,
            a.vocab_size);
  QKD_CHECK(a.dim % 8 == 0, "embedding_backward: dim {} is not a multiple of 8 (16-byte accesses)", a.dim);
  QKD_CHECK(reinterpret_cast<uintptr_t>(a.dtable) % 16 == 0 && reinterpret_cast<uintptr_t>(a.dout) % 16 == 0,
            "embedding_backward: dtable {} / dout {} are not 16-byte aligned", static_cast<const void*>(a.dtable),
            static_cast<const void*>(a.dout));
  if (a.n_tokens == 0) return;
  QKD_CHECK(a.tokens != nullptr && a.dtable != nullptr && a.dout != nullptr,
            "embedding_backward: dtable, dout and tokens must all be given with n_tokens {}", a.n_tokens);
  const int col_blocks = (a.dim + kColsPerBlock - 1) / kColsPerBlock;
  QKD_CHECK(col_blocks <= 65535, "embedding_backward: dim {} exceeds the grid", a.dim);
  const int n_buckets = std::max(1, std::min(a.vocab_size, kTargetBlocks / col_blocks));
  const dim3 grid(n_buckets, col_blocks);
  embedding_backward_kernel<<<grid, kBackwardThreads, 0, stream>>>(a.dtable, reinterpret_cast<const uint4*>(a.dout),
                                                                   a.tokens, a.n_tokens, a.dim, a.vocab_size,
                                                                   n_buckets);
  KERNEL_CHECK();
}

}  // namespace qkd::cuda
