// CPU reference: the SwiGLU activation of the LLaMA MLP (kernels/swiglu.h).
//   out[r, c] = silu(gate[r, c]) * up[r, c],  silu(g) = g / (1 + exp(-g))      (out overwritten)
// gate/up rows are ld_in apart so the two halves of one fused projection can be read in place. The backward
// will sit beside the forward in this file.
#include <cmath>
#include <cstdint>

#include "kernels/error.h"
#include "kernels/swiglu.h"

namespace qkd::cpu {

void swiglu_forward(const SwigluArgs<float>& a) {
  QKD_CHECK(a.rows >= 0 && a.ffn_dim > 0, "swiglu_forward: rows {} / ffn_dim {} invalid", a.rows, a.ffn_dim);
  QKD_CHECK(a.ld_in >= a.ffn_dim, "swiglu_forward: row stride ld_in {} is smaller than ffn_dim {}", a.ld_in,
            a.ffn_dim);
#pragma omp parallel for schedule(static) if (a.rows > 1)
  for (int r = 0; r < a.rows; ++r) {
    const float* gate = a.gate + r * a.ld_in;
    const float* up = a.up + r * a.ld_in;
    float* out = a.out + static_cast<int64_t>(r) * a.ffn_dim;
    // exp(-g) overflows to inf for g < -88, and g / inf = -0, which is silu's limit: no special case needed.
    for (int c = 0; c < a.ffn_dim; ++c) out[c] = gate[c] / (1.0f + std::exp(-gate[c])) * up[c];
  }
}

}  // namespace qkd::cpu
