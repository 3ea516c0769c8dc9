// CPU reference: rotary position embedding on INTERLEAVED pairs, in place (kernels/rope.h).
//   pair i of each head: (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i]
// Angles and their sin/cos are taken in double once per token and shared by all heads: positions reach the
// tens of thousands, where an fp32 product pos * inv_freq already loses ~1e-3 rad. The backward (the same
// rotation by -angle) will sit beside the forward in this file.
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/error.h"
#include "kernels/rope.h"

namespace qkd::cpu {

void rope_forward(const RopeArgs<float>& a) {
  QKD_CHECK(a.n_tokens >= 0 && a.n_heads > 0, "rope_forward: n_tokens {} / n_heads {} invalid", a.n_tokens,
            a.n_heads);
  QKD_CHECK(a.head_dim > 0 && a.head_dim % 2 == 0, "rope_forward: head_dim {} must be even and positive",
            a.head_dim);
  for (int t = 0; t < a.n_tokens; ++t) {
    QKD_CHECK(a.positions[t] >= 0, "rope_forward: position {} of token {} is negative", a.positions[t], t);
  }
  const int half = a.head_dim / 2;
#pragma omp parallel if (a.n_tokens > 1)
  {
    std::vector<float> cos_t(half), sin_t(half);
#pragma omp for schedule(static)
    for (int t = 0; t < a.n_tokens; ++t) {
      for (int i = 0; i < half; ++i) {
        const double angle = static_cast<double>(a.positions[t]) * a.inv_freq[i];
        cos_t[i] = static_cast<float>(std::cos(angle));
        sin_t[i] = static_cast<float>(std::sin(angle));
      }
      float* row = a.x + static_cast<int64_t>(t) * a.n_heads * a.head_dim;
      for (int h = 0; h < a.n_heads; ++h) {
        float* x = row + static_cast<int64_t>(h) * a.head_dim;
        for (int i = 0; i < half; ++i) {
          const float x0 = x[2 * i], x1 = x[2 * i + 1];
          x[2 * i] = x0 * cos_t[i] - x1 * sin_t[i];
          x[2 * i + 1] = x0 * sin_t[i] + x1 * cos_t[i];
        }
      }
    }
  }
}

}  // namespace qkd::cpu
