// CPU reference: the SwiGLU activation of the LLaMA MLP and its backward (kernels/swiglu.h).
//   out[r, c] = silu(gate[r, c]) * up[r, c],  silu(g) = g / (1 + exp(-g))      (out overwritten)
//   dgate = dout * up * silu'(gate),  silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))   (overwritten)
//   dup   = dout * silu(gate)                                                            (overwritten)
// gate/up rows (and dgate/dup rows) are ld_in apart so the two halves of one fused projection can be read and
// written in place. fp32 and fp64 share one template; the fp64 instance exists for the finite-difference checks.
#include <cmath>
#include <cstdint>

#include "kernels/error.h"
#include "kernels/swiglu.h"

namespace qkd::cpu {
namespace {

template <typename T>
void forward_impl(const SwigluArgs<T>& a) {
  QKD_CHECK(a.rows >= 0 && a.ffn_dim > 0, "swiglu_forward: rows {} / ffn_dim {} invalid", a.rows, a.ffn_dim);
  QKD_CHECK(a.ld_in >= a.ffn_dim, "swiglu_forward: row stride ld_in {} is smaller than ffn_dim {}", a.ld_in,
            a.ffn_dim);
#pragma omp parallel for schedule(static) if (a.rows > 1)
  for (int r = 0; r < a.rows; ++r) {
    const T* gate = a.gate + r * a.ld_in;
    const T* up = a.up + r * a.ld_in;
    T* out = a.out + static_cast<int64_t>(r) * a.ffn_dim;
    // exp(-g) overflows to inf for g < -88, and g / inf = -0, which is silu's limit: no special case needed.
    for (int c = 0; c < a.ffn_dim; ++c) out[c] = gate[c] / (T(1) + std::exp(-gate[c])) * up[c];
  }
}

template <typename T>
void backward_impl(const SwigluBackwardArgs<T>& a) {
  QKD_CHECK(a.rows >= 0 && a.ffn_dim > 0, "swiglu_backward: rows {} / ffn_dim {} invalid", a.rows, a.ffn_dim);
  QKD_CHECK(a.ld_in >= a.ffn_dim, "swiglu_backward: row stride ld_in {} is smaller than ffn_dim {}", a.ld_in,
            a.ffn_dim);
  QKD_CHECK(a.dgate != a.dup || a.rows == 0, "swiglu_backward: dgate and dup may not be the same buffer");
#pragma omp parallel for schedule(static) if (a.rows > 1)
  for (int r = 0; r < a.rows; ++r) {
    const T* gate = a.gate + r * a.ld_in;
    const T* up = a.up + r * a.ld_in;
    const T* dout = a.dout + static_cast<int64_t>(r) * a.ffn_dim;
    T* dgate = a.dgate + r * a.ld_in;
    T* dup = a.dup + r * a.ld_in;
    for (int c = 0; c < a.ffn_dim; ++c) {
      // Both inputs are read before either output is written, so dgate/dup may overwrite gate/up in place.
      const T g = gate[c], u = up[c], d = dout[c];
      // exp(-g) = inf for very negative g gives sig = 0 and silu' = 0 * (1 + g) = 0: the true limits, no NaN.
      const T sig = T(1) / (T(1) + std::exp(-g));
      dgate[c] = d * u * (sig * (T(1) + g * (T(1) - sig)));
      dup[c] = d * (g * sig);
    }
  }
}

}  // namespace

void swiglu_forward(const SwigluArgs<float>& a) { forward_impl(a); }
void swiglu_forward(const SwigluArgs<double>& a) { forward_impl(a); }
void swiglu_backward(const SwigluBackwardArgs<float>& a) { backward_impl(a); }
void swiglu_backward(const SwigluBackwardArgs<double>& a) { backward_impl(a); }

}  // namespace qkd::cpu
