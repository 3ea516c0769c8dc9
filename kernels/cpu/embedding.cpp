// CPU reference: embedding gather (kernels/embedding.h).
//   forward: out[t, :] = table[tokens[t], :]        (out overwritten)
// The backward (a scatter-add into the table's gradient) will sit beside the forward in this file.
#include <cstring>

#include "kernels/embedding.h"
#include "kernels/error.h"

namespace qkd::cpu {

void embedding_forward(const EmbeddingArgs<float>& a) {
  QKD_CHECK(a.n_tokens >= 0, "embedding_forward: n_tokens {} is negative", a.n_tokens);
  QKD_CHECK(a.dim > 0 && a.vocab_size > 0, "embedding_forward: dim {} and vocab_size {} must be positive", a.dim,
            a.vocab_size);
  // The header lets kernels trust the ids; the reference checks them anyway because a bad id here is a silent
  // out-of-bounds read, and the check costs nothing next to the copy. Done before the parallel loop so the
  // throw never leaves an OpenMP region.
  for (int t = 0; t < a.n_tokens; ++t) {
    QKD_CHECK(a.tokens[t] >= 0 && a.tokens[t] < a.vocab_size,
              "embedding_forward: token {} at index {} is outside the vocabulary [0, {})", a.tokens[t], t,
              a.vocab_size);
  }
  const size_t row_bytes = static_cast<size_t>(a.dim) * sizeof(float);
#pragma omp parallel for schedule(static) if (a.n_tokens > 16)
  for (int t = 0; t < a.n_tokens; ++t) {
    std::memcpy(a.out + static_cast<int64_t>(t) * a.dim, a.table + static_cast<int64_t>(a.tokens[t]) * a.dim,
                row_bytes);
  }
}

}  // namespace qkd::cpu
