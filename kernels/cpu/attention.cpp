// CPU reference: causal grouped-query attention over a strided KV cache (kernels/attention.h).
//   query (b, i, h) at absolute position p = start_pos[b] + i reads kv head g = h / (n_heads / n_kv_heads):
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q . k_j) * v_j          (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                  (written when lse != nullptr)
// One (b, i, h) row at a time, exact softmax (max first, then exp): the reference favours clarity over the
// online-softmax tiling the CUDA kernel uses. The softmax denominator is summed in double so lse stays exact
// to fp32 rounding even over long contexts. The backward will sit beside the forward in this file.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/error.h"

namespace qkd::cpu {
namespace {

// Eight independent partial sums in one GCC/Clang vector, so the dot product is vector code without
// -ffast-math (the auto-vectorizer will not reassociate a float reduction).
constexpr int kLanes = 8;
using Vec8 = float __attribute__((vector_size(kLanes * sizeof(float))));

float dot(const float* a, const float* b, int n) {
  Vec8 acc = {};
  const int n_main = n - n % kLanes;
  for (int i = 0; i < n_main; i += kLanes) {
    Vec8 va, vb;
    std::memcpy(&va, a + i, sizeof va);
    std::memcpy(&vb, b + i, sizeof vb);
    acc += va * vb;
  }
  float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (int i = n_main; i < n; ++i) s += a[i] * b[i];
  return s;
}

void check_args(const AttentionArgs<float>& a) {
  QKD_CHECK(a.batch >= 0 && a.seq_len >= 0, "attention_forward: batch {} / seq_len {} invalid", a.batch,
            a.seq_len);
  QKD_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0,
            "attention_forward: n_heads {} is not a positive multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads);
  QKD_CHECK(a.head_dim > 0, "attention_forward: head_dim {} must be positive", a.head_dim);
  QKD_CHECK(a.kv_seq_stride >= a.head_dim, "attention_forward: kv_seq_stride {} is smaller than head_dim {}",
            a.kv_seq_stride, a.head_dim);
  QKD_CHECK(a.kv_head_stride >= a.head_dim, "attention_forward: kv_head_stride {} is smaller than head_dim {}",
            a.kv_head_stride, a.head_dim);
  QKD_CHECK(a.kv_batch_stride >= 0, "attention_forward: kv_batch_stride {} is negative", a.kv_batch_stride);
  for (int b = 0; b < a.batch; ++b) {
    QKD_CHECK(a.start_pos[b] >= 0, "attention_forward: start_pos[{}] = {} is negative", b, a.start_pos[b]);
  }
}

}  // namespace

void attention_forward(const AttentionArgs<float>& a) {
  check_args(a);
  const int group = a.n_heads / a.n_kv_heads;
  int max_len = 0;
  for (int b = 0; b < a.batch; ++b) max_len = std::max(max_len, a.start_pos[b] + a.seq_len);
  const int64_t rows = static_cast<int64_t>(a.batch) * a.seq_len * a.n_heads;

#pragma omp parallel if (rows > 1)
  {
    std::vector<float> scores(max_len);
    std::vector<float> acc(a.head_dim);
    // Consecutive rows are the heads of one token: neighbours in a group share their kv head's cache lines.
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % a.n_heads);
      const int i = static_cast<int>(row / a.n_heads % a.seq_len);
      const int b = static_cast<int>(row / a.n_heads / a.seq_len);
      const int g = h / group;
      const int n_keys = a.start_pos[b] + i + 1;
      const int64_t qo = ((static_cast<int64_t>(b) * a.seq_len + i) * a.n_heads + h) * a.head_dim;
      const float* q = a.q + qo;
      const float* k = a.k + b * a.kv_batch_stride + g * a.kv_head_stride;
      const float* v = a.v + b * a.kv_batch_stride + g * a.kv_head_stride;

      float max_score = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n_keys; ++j) {
        scores[j] = a.scale * dot(q, k + j * a.kv_seq_stride, a.head_dim);
        max_score = std::max(max_score, scores[j]);
      }
      double denom = 0.0;
      for (int j = 0; j < n_keys; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        denom += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int j = 0; j < n_keys; ++j) {
        const float p = scores[j];
        const float* vj = v + j * a.kv_seq_stride;
        for (int d = 0; d < a.head_dim; ++d) acc[d] += p * vj[d];
      }
      const float inv = static_cast<float>(1.0 / denom);
      float* out = a.out + qo;
      for (int d = 0; d < a.head_dim; ++d) out[d] = acc[d] * inv;
      if (a.lse != nullptr) {
        a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + i] =
            static_cast<float>(max_score + std::log(denom));
      }
    }
  }
}

}  // namespace qkd::cpu
