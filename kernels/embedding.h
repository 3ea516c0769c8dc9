// Embedding gather.  forward: out[t, :] = table[tokens[t], :]            (out overwritten)
// Token ids are validated by the caller (runtime) against vocab_size; the kernels trust them.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

template <typename T>
struct EmbeddingArgs {
  T* out;                  // [n_tokens, dim]
  const T* table;          // [vocab_size, dim]
  const int32_t* tokens;   // [n_tokens]
  int n_tokens, dim, vocab_size;
};

namespace cpu {
void embedding_forward(const EmbeddingArgs<float>& a);
}
namespace cuda {
void embedding_forward(const EmbeddingArgs<__nv_bfloat16>& a, cudaStream_t stream);
}

}  // namespace qkd
