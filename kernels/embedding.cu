// CUDA embedding gather (kernels/embedding.h).
//   forward: out[t, :] = table[tokens[t], :]            (out overwritten)
// A pure copy: one block per token row, 16-byte accesses. The backward (a scatter-add into the table's
// gradient) will sit beside the forward in this file.
#include <cstdint>

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

}  // namespace qkd::cuda
