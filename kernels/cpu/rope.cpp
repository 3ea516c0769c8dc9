// CPU reference: rotary position embedding on INTERLEAVED pairs, in place, and its backward (kernels/rope.h).
//   forward:  pair i of each head: (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i]
//   backward: the same pairs rotated by -angle (the rotation is orthogonal: its inverse is its transpose)
// Angles and their sin/cos are taken in double once per token and shared by all heads: positions reach the
// tens of thousands, where an fp32 product pos * inv_freq already loses ~1e-3 rad. Both directions run one
// loop; the backward negates sin, which is exact, so it is the forward's rotation with the sign flipped and
// nothing else.
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/error.h"
#include "kernels/rope.h"

namespace qkd::cpu {
namespace {

enum class Direction { Forward, Backward };

template <typename T>
void rotate(const RopeArgs<T>& a, Direction dir) {
  const char* name = dir == Direction::Forward ? "rope_forward" : "rope_backward";
  QKD_CHECK(a.n_tokens >= 0 && a.n_heads > 0, "{}: n_tokens {} / n_heads {} invalid", name, a.n_tokens,
            a.n_heads);
  QKD_CHECK(a.head_dim > 0 && a.head_dim % 2 == 0, "{}: head_dim {} must be even and positive", name,
            a.head_dim);
  for (int t = 0; t < a.n_tokens; ++t) {
    QKD_CHECK(a.positions[t] >= 0, "{}: position {} of token {} is negative", name, a.positions[t], t);
  }
  const int half = a.head_dim / 2;
  const double sign = dir == Direction::Forward ? 1.0 : -1.0;
#pragma omp parallel if (a.n_tokens > 1)
  {
    std::vector<T> cos_t(half), sin_t(half);
#pragma omp for schedule(static)
    for (int t = 0; t < a.n_tokens; ++t) {
      for (int i = 0; i < half; ++i) {
        const double angle = static_cast<double>(a.positions[t]) * a.inv_freq[i];
        cos_t[i] = static_cast<T>(std::cos(angle));
        sin_t[i] = static_cast<T>(sign * std::sin(angle));
      }
      T* row = a.x + static_cast<int64_t>(t) * a.n_heads * a.head_dim;
      for (int h = 0; h < a.n_heads; ++h) {
        T* x = row + static_cast<int64_t>(h) * a.head_dim;
        for (int i = 0; i < half; ++i) {
          const T x0 = x[2 * i], x1 = x[2 * i + 1];
          x[2 * i] = x0 * cos_t[i] - x1 * sin_t[i];
          x[2 * i + 1] = x0 * sin_t[i] + x1 * cos_t[i];
        }
      }
    }
  }
}

}  // namespace

void rope_forward(const RopeArgs<float>& a) { rotate(a, Direction::Forward); }
void rope_forward(const RopeArgs<double>& a) { rotate(a, Direction::Forward); }
void rope_backward(const RopeArgs<float>& a) { rotate(a, Direction::Backward); }
void rope_backward(const RopeArgs<double>& a) { rotate(a, Direction::Backward); }

}  // namespace qkd::cpu
