// CPU reference: embedding gather and its backward (kernels/embedding.h).
//   forward:  out[t, :] = table[tokens[t], :]            (out overwritten)
//   backward: dtable[tokens[t], :] += dout[t, :]         (scatter-add, accumulates, in acc_t<T>)
// The backward splits the columns of dtable between threads and each thread walks the tokens in order, so a
// row hit by repeated tokens is summed in token order whatever the thread count: the same bits on every run.
// fp32 and fp64 share one template; the fp64 instance exists for the finite-difference checks.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/embedding.h"
#include "kernels/error.h"

namespace qkd::cpu {
namespace {

// The header lets kernels trust the ids; the reference checks them anyway because a bad id here is a silent
// out-of-bounds access, and the check costs nothing next to the copy. Called before any parallel loop so the
// throw never leaves an OpenMP region, and before any write so a rejected call changes nothing.
void check_tokens(const char* name, const int32_t* tokens, int n_tokens, int vocab_size) {
  for (int t = 0; t < n_tokens; ++t) {
    QKD_CHECK(tokens[t] >= 0 && tokens[t] < vocab_size, "{}: token {} at index {} is outside the vocabulary [0, {})",
              name, tokens[t], t, vocab_size);
  }
}

template <typename T>
void forward_impl(const EmbeddingArgs<T>& a) {
  QKD_CHECK(a.n_tokens >= 0, "embedding_forward: n_tokens {} is negative", a.n_tokens);
  QKD_CHECK(a.dim > 0 && a.vocab_size > 0, "embedding_forward: dim {} and vocab_size {} must be positive", a.dim,
            a.vocab_size);
  check_tokens("embedding_forward", a.tokens, a.n_tokens, a.vocab_size);
  const size_t row_bytes = static_cast<size_t>(a.dim) * sizeof(T);
#pragma omp parallel for schedule(static) if (a.n_tokens > 16)
  for (int t = 0; t < a.n_tokens; ++t) {
    std::memcpy(a.out + static_cast<int64_t>(t) * a.dim, a.table + static_cast<int64_t>(a.tokens[t]) * a.dim,
                row_bytes);
  }
}

// Column strip of dtable owned by one thread: 64 fp32 columns are a 256-byte run of each row.
constexpr int kColumnStrip = 64;

template <typename T>
void backward_impl(const EmbeddingBackwardArgs<T>& a) {
  QKD_CHECK(a.n_tokens >= 0, "embedding_backward: n_tokens {} is negative", a.n_tokens);
  QKD_CHECK(a.dim > 0 && a.vocab_size > 0, "embedding_backward: dim {} and vocab_size {} must be positive", a.dim,
            a.vocab_size);
  check_tokens("embedding_backward", a.tokens, a.n_tokens, a.vocab_size);
  const int n_strips = (a.dim + kColumnStrip - 1) / kColumnStrip;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(a.n_tokens) * a.dim > 65536)
  for (int s = 0; s < n_strips; ++s) {
    const int c0 = s * kColumnStrip, c1 = std::min(a.dim, c0 + kColumnStrip);
    for (int t = 0; t < a.n_tokens; ++t) {
      acc_t<T>* dst = a.dtable + static_cast<int64_t>(a.tokens[t]) * a.dim;
      const T* src = a.dout + static_cast<int64_t>(t) * a.dim;
      for (int c = c0; c < c1; ++c) dst[c] += static_cast<acc_t<T>>(src[c]);
    }
  }
}

}  // namespace

void embedding_forward(const EmbeddingArgs<float>& a) { forward_impl(a); }
void embedding_forward(const EmbeddingArgs<double>& a) { forward_impl(a); }
void embedding_backward(const EmbeddingBackwardArgs<float>& a) { backward_impl(a); }
void embedding_backward(const EmbeddingBackwardArgs<double>& a) { backward_impl(a); }

}  // namespace qkd::cpu
