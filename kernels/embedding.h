// Embedding gather.  forward: out[t, :] = table[tokens[t], :]            (out overwritten)
//           backward: dtable[tokens[t], :] += dout[t, :]       (scatter-add, accumulates, in acc_t<T>)
// Token ids are validated by the caller (runtime) against vocab_size; the kernels trust them.
// The CUDA backward is deterministic (no float atomics): repeated tokens are summed in token order.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/dtype.h"

namespace qkd {

template <typename T>
struct EmbeddingArgs {
  T* out;                  // [n_tokens, dim]
  const T* table;          // [vocab_size, dim]
  const int32_t* tokens;   // [n_tokens]
  int n_tokens, dim, vocab_size;
};

template <typename T>
struct EmbeddingBackwardArgs {
  acc_t<T>* dtable;        // [vocab_size, dim]  accumulated (+=)
  const T* dout;           // [n_tokens, dim]
  const int32_t* tokens;   // [n_tokens]
  int n_tokens, dim, vocab_size;
};

namespace cpu {
void embedding_forward(const EmbeddingArgs<float>& a);
void embedding_forward(const EmbeddingArgs<double>& a);
void embedding_backward(const EmbeddingBackwardArgs<float>& a);
void embedding_backward(const EmbeddingBackwardArgs<double>& a);
}  // namespace cpu
namespace cuda {
void embedding_forward(const EmbeddingArgs<__nv_bfloat16>& a, cudaStream_t stream);
void embedding_backward(const EmbeddingBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
