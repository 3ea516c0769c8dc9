// CPU reference: causal grouped-query attention over a strided KV cache, and its backward (kernels/attention.h).
//   query (b, i, h) at absolute position p = start_pos[b] + i reads kv head g = h / (n_heads / n_kv_heads):
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q . k_j) * v_j          (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                  (written when lse != nullptr)
// backward (start_pos 0, k/v contiguous [batch, seq_len, n_kv_heads, head_dim]), P_ij = exp(scale q_i.k_j - lse_i):
//   delta_i = dout_i . out_i,  dS_ij = P_ij (dout_i . v_j - delta_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in group, i >= j} dS_ij q_i,  dv_j = sum P_ij dout_i
//   dq, dk, dv overwritten.
// Forward: one (b, i, h) row at a time, exact softmax (max first, then exp): the reference favours clarity over
// the online-softmax tiling the CUDA kernel uses. The softmax denominator is summed in double so lse stays exact
// to fp32 rounding even over long contexts.
// Backward: two passes that each own their outputs, so no thread ever adds into another's rows and the result
// is the same bits whatever the thread count. Pass 1 walks the query rows (dq, plus each row's lse and delta);
// pass 2 walks the key rows (dk, dv), recomputing P and dS column-wise from q, k, lse and delta. The score
// matrix is recomputed rather than stored: seq x seq per head would not fit for long training sequences.
// fp32 and fp64 share one template; the fp64 instance exists for the finite-difference checks and recomputes
// the softmax in double instead of reading the fp32 lse.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/error.h"

namespace qkd::cpu {
namespace {

// Eight independent partial sums in one GCC/Clang vector, so the fp32 dot product is vector code without
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

// The fp64 instance only runs on the tiny shapes of the finite-difference checks: a plain loop.
double dot(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void check_args(const AttentionArgs<T>& a) {
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

template <typename T>
void check_args(const AttentionBackwardArgs<T>& a) {
  QKD_CHECK(a.batch >= 0 && a.seq_len >= 0, "attention_backward: batch {} / seq_len {} invalid", a.batch,
            a.seq_len);
  QKD_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0,
            "attention_backward: n_heads {} is not a positive multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads);
  QKD_CHECK(a.head_dim > 0, "attention_backward: head_dim {} must be positive", a.head_dim);
  if (a.batch == 0 || a.seq_len == 0) return;
  QKD_CHECK(a.dq != nullptr && a.dk != nullptr && a.dv != nullptr,
            "attention_backward: dq, dk and dv are required (dq {}, dk {}, dv {})", static_cast<const void*>(a.dq),
            static_cast<const void*>(a.dk), static_cast<const void*>(a.dv));
  QKD_CHECK(a.dout != nullptr && a.q != nullptr && a.k != nullptr && a.v != nullptr && a.out != nullptr,
            "attention_backward: dout, q, k, v and out are required (dout {}, q {}, k {}, v {}, out {})",
            static_cast<const void*>(a.dout), static_cast<const void*>(a.q), static_cast<const void*>(a.k),
            static_cast<const void*>(a.v), static_cast<const void*>(a.out));
  // The fp32 pass reads the forward's lse; the fp64 pass recomputes it (see the file comment).
  constexpr bool reads_lse = std::is_same_v<T, float>;
  QKD_CHECK(!reads_lse || a.lse != nullptr, "attention_backward: lse (the forward's) is required");
  // Pass 2 still reads q, k, v and dout after pass 1 has written dq: no gradient may share an input's buffer.
  for (const T* grad : {a.dq, a.dk, a.dv}) {
    for (const T* in : {a.dout, a.q, a.k, a.v, a.out}) {
      QKD_CHECK(grad != in, "attention_backward: a gradient (dq {}, dk {}, dv {}) aliases an input ({})",
                static_cast<const void*>(a.dq), static_cast<const void*>(a.dk), static_cast<const void*>(a.dv),
                static_cast<const void*>(in));
    }
  }
  QKD_CHECK(a.dq != a.dk && a.dq != a.dv && a.dk != a.dv, "attention_backward: dq, dk and dv must be distinct");
}

template <typename T>
void forward_impl(const AttentionArgs<T>& a) {
  check_args(a);
  const int group = a.n_heads / a.n_kv_heads;
  int max_len = 0;
  for (int b = 0; b < a.batch; ++b) max_len = std::max(max_len, a.start_pos[b] + a.seq_len);
  const int64_t rows = static_cast<int64_t>(a.batch) * a.seq_len * a.n_heads;

#pragma omp parallel if (rows > 1)
  {
    std::vector<T> scores(max_len);
    std::vector<T> acc(a.head_dim);
    // Consecutive rows are the heads of one token: neighbours in a group share their kv head's cache lines.
    // Each row is owned by one iteration and summed in a fixed order, so the dynamic schedule changes no bits.
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % a.n_heads);
      const int i = static_cast<int>(row / a.n_heads % a.seq_len);
      const int b = static_cast<int>(row / a.n_heads / a.seq_len);
      const int g = h / group;
      const int n_keys = a.start_pos[b] + i + 1;
      const int64_t qo = ((static_cast<int64_t>(b) * a.seq_len + i) * a.n_heads + h) * a.head_dim;
      const T* q = a.q + qo;
      const T* k = a.k + b * a.kv_batch_stride + g * a.kv_head_stride;
      const T* v = a.v + b * a.kv_batch_stride + g * a.kv_head_stride;

      T max_score = -std::numeric_limits<T>::infinity();
      for (int j = 0; j < n_keys; ++j) {
        scores[j] = a.scale * dot(q, k + j * a.kv_seq_stride, a.head_dim);
        max_score = std::max(max_score, scores[j]);
      }
      double denom = 0.0;
      for (int j = 0; j < n_keys; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        denom += scores[j];
      }
      std::fill(acc.begin(), acc.end(), T(0));
      for (int j = 0; j < n_keys; ++j) {
        const T p = scores[j];
        const T* vj = v + j * a.kv_seq_stride;
        for (int d = 0; d < a.head_dim; ++d) acc[d] += p * vj[d];
      }
      const T inv = static_cast<T>(1.0 / denom);
      T* out = a.out + qo;
      for (int d = 0; d < a.head_dim; ++d) out[d] = acc[d] * inv;
      if (a.lse != nullptr) {
        a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + i] =
            static_cast<float>(max_score + std::log(denom));
      }
    }
  }
}

template <typename T>
void backward_impl(const AttentionBackwardArgs<T>& a) {
  check_args(a);
  if (a.batch == 0 || a.seq_len == 0) return;
  const int seq_len = a.seq_len, n_heads = a.n_heads, n_kv_heads = a.n_kv_heads, head_dim = a.head_dim;
  const int group = n_heads / n_kv_heads;
  const T scale = static_cast<T>(a.scale);
  // Element offsets of the rows: q/out/dout/dq are [batch, seq_len, n_heads, head_dim], k/v/dk/dv
  // [batch, seq_len, n_kv_heads, head_dim].
  auto q_row = [&](int b, int i, int h) {
    return ((static_cast<int64_t>(b) * seq_len + i) * n_heads + h) * head_dim;
  };
  auto kv_row = [&](int b, int j, int g) {
    return ((static_cast<int64_t>(b) * seq_len + j) * n_kv_heads + g) * head_dim;
  };
  // lse and delta of every query row, [batch, n_heads, seq_len] as the forward's lse: pass 1 fills them, pass 2
  // reads them. T, not float: the fp64 instance keeps its recomputed lse in double.
  const int64_t n_rows = static_cast<int64_t>(a.batch) * seq_len * n_heads;
  std::vector<T> lse(n_rows), delta(n_rows);
  auto stat = [&](int b, int h, int i) { return (static_cast<int64_t>(b) * n_heads + h) * seq_len + i; };
  const int64_t n_kv_rows = static_cast<int64_t>(a.batch) * seq_len * n_kv_heads;

#pragma omp parallel if (n_rows > 1)
  {
    std::vector<T> scores(seq_len), dq_acc(head_dim), dk_acc(head_dim), dv_acc(head_dim);
    // Pass 1: query rows (b, i, h), consecutive rows the heads of one token. The causal rows grow with i, so
    // the static schedule deals them out one at a time (round robin) to balance the triangle.
#pragma omp for schedule(static, 1)
    for (int64_t row = 0; row < n_rows; ++row) {
      const int h = static_cast<int>(row % n_heads);
      const int i = static_cast<int>(row / n_heads % seq_len);
      const int b = static_cast<int>(row / n_heads / seq_len);
      const int g = h / group;
      const T* q = a.q + q_row(b, i, h);
      const T* dout = a.dout + q_row(b, i, h);
      for (int j = 0; j <= i; ++j) scores[j] = scale * dot(q, a.k + kv_row(b, j, g), head_dim);
      T row_lse;
      if constexpr (std::is_same_v<T, float>) {
        row_lse = a.lse[stat(b, h, i)];
      } else {
        T max_score = -std::numeric_limits<T>::infinity();
        for (int j = 0; j <= i; ++j) max_score = std::max(max_score, scores[j]);
        double denom = 0.0;
        for (int j = 0; j <= i; ++j) denom += std::exp(scores[j] - max_score);
        row_lse = static_cast<T>(max_score + std::log(denom));
      }
      const T row_delta = dot(dout, a.out + q_row(b, i, h), head_dim);
      lse[stat(b, h, i)] = row_lse;
      delta[stat(b, h, i)] = row_delta;
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));
      for (int j = 0; j <= i; ++j) {
        const int64_t kj = kv_row(b, j, g);
        const T p = std::exp(scores[j] - row_lse);
        const T ds = p * (dot(dout, a.v + kj, head_dim) - row_delta);
        for (int d = 0; d < head_dim; ++d) dq_acc[d] += ds * a.k[kj + d];
      }
      T* dq = a.dq + q_row(b, i, h);
      for (int d = 0; d < head_dim; ++d) dq[d] = scale * dq_acc[d];
    }
    // (the implicit barrier: pass 2 reads every row's lse and delta)

    // Pass 2: key rows (b, j, g); key j is read by the queries i >= j of the group's heads, so the work shrinks
    // with j and is dealt out round robin as well.
#pragma omp for schedule(static, 1)
    for (int64_t row = 0; row < n_kv_rows; ++row) {
      const int g = static_cast<int>(row % n_kv_heads);
      const int j = static_cast<int>(row / n_kv_heads % seq_len);
      const int b = static_cast<int>(row / n_kv_heads / seq_len);
      const int64_t kj = kv_row(b, j, g);
      const T* k = a.k + kj;
      const T* v = a.v + kj;
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int i = j; i < seq_len; ++i) {
          const T* q = a.q + q_row(b, i, h);
          const T* dout = a.dout + q_row(b, i, h);
          const T p = std::exp(scale * dot(q, k, head_dim) - lse[stat(b, h, i)]);
          const T ds = p * (dot(dout, v, head_dim) - delta[stat(b, h, i)]);
          for (int d = 0; d < head_dim; ++d) dk_acc[d] += ds * q[d];
          for (int d = 0; d < head_dim; ++d) dv_acc[d] += p * dout[d];
        }
      }
      for (int d = 0; d < head_dim; ++d) a.dk[kj + d] = scale * dk_acc[d];
      for (int d = 0; d < head_dim; ++d) a.dv[kj + d] = dv_acc[d];
    }
  }
}

}  // namespace

void attention_forward(const AttentionArgs<float>& a) { forward_impl(a); }
void attention_forward(const AttentionArgs<double>& a) { forward_impl(a); }
void attention_backward(const AttentionBackwardArgs<float>& a) { backward_impl(a); }
void attention_backward(const AttentionBackwardArgs<double>& a) { backward_impl(a); }

}  // namespace qkd::cpu
