// CPU reference: fused cross-entropy and temperature KL over the vocabulary (kernels/softmax_loss.h).
//   ce[r] = lse(z) - z[y]                                   (0 when y < 0 or no targets; overwritten)
//   kl[r] = tau^2 sum_i p_t[i] (log p_t[i] - log p_s[i])     p_t = softmax(t / tau), p_s = softmax(z / tau)
//   dz    = grad_scale (ce_weight (softmax(z) - onehot(y)) + kl_weight tau (p_s - p_t))   (overwrites z)
// Per row: one pass for the maxima, one for the sums of exponentials, and one that forms the KL terms from the
// normalised log-probabilities (x - max) / tau - log sum (so KL is exactly 0 when t == z) and writes dz, all in
// acc_t<T>. max(z / tau) is at the same index as max(z), so one maximum serves both student softmaxes.
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/error.h"
#include "kernels/softmax_loss.h"

namespace qkd::cpu {

namespace {

template <typename T>
void softmax_loss_impl(const SoftmaxLossArgs<T>& a) {
  using A = acc_t<T>;
  QKD_CHECK(a.rows >= 0, "softmax_loss: rows {} is negative", a.rows);
  QKD_CHECK(a.vocab > 0, "softmax_loss: vocab {} must be positive", a.vocab);
  QKD_CHECK(a.ld >= a.vocab, "softmax_loss: ld {} is below vocab {}", a.ld, a.vocab);
  QKD_CHECK(a.temperature > 0.0f && std::isfinite(a.temperature), "softmax_loss: temperature {} must be positive",
            a.temperature);
  // Checked before the parallel loop (no throw may leave it); the CUDA kernel reports such a row as NaN instead.
  if (a.targets != nullptr) {
    for (int r = 0; r < a.rows; ++r) {
      QKD_CHECK(a.targets[r] < a.vocab, "softmax_loss: target {} of row {} is outside the vocabulary [0, {})",
                a.targets[r], r, a.vocab);
    }
  }
  const A tau = static_cast<A>(a.temperature);
  const bool use_tau = a.temperature != 1.0f;
  const bool has_teacher = a.teacher != nullptr;
#pragma omp parallel for schedule(static) if (a.rows > 1)
  for (int r = 0; r < a.rows; ++r) {
    T* z = a.logits + static_cast<int64_t>(r) * a.ld;
    const T* t = has_teacher ? a.teacher + static_cast<int64_t>(r) * a.ld : nullptr;
    const int y = a.targets != nullptr ? a.targets[r] : -1;

    A mz = -std::numeric_limits<A>::infinity(), mt = mz;
    for (int i = 0; i < a.vocab; ++i) {
      mz = std::fmax(mz, static_cast<A>(z[i]));
      if (has_teacher) mt = std::fmax(mt, static_cast<A>(t[i]));
    }
    A sz = 0, szs = 0, st = 0;
    for (int i = 0; i < a.vocab; ++i) {
      sz += std::exp(static_cast<A>(z[i]) - mz);
      if (use_tau) szs += std::exp((static_cast<A>(z[i]) - mz) / tau);
      if (has_teacher) st += std::exp((static_cast<A>(t[i]) - mt) / tau);
    }
    if (!use_tau) szs = sz;
    const A log_szs = std::log(szs), log_st = has_teacher ? std::log(st) : A(0);

    if (a.ce != nullptr) a.ce[r] = y >= 0 ? (mz + std::log(sz)) - static_cast<A>(z[y]) : A(0);
    const A cw = y >= 0 ? static_cast<A>(a.ce_weight) : A(0);
    const A kw = has_teacher ? static_cast<A>(a.kl_weight) * tau : A(0);
    const A gs = static_cast<A>(a.grad_scale);
    A kl = 0;
    for (int i = 0; i < a.vocab; ++i) {
      const A zi = static_cast<A>(z[i]);
      A d = 0;
      if (has_teacher) {
        const A log_ps = (zi - mz) / tau - log_szs;
        const A log_pt = (static_cast<A>(t[i]) - mt) / tau - log_st;
        const A pt = std::exp(log_pt);
        if (pt > 0) kl += pt * (log_pt - log_ps);
        d += kw * (std::exp(log_ps) - pt);
      }
      if (y >= 0) d += cw * (std::exp(zi - mz) / sz - (i == y ? A(1) : A(0)));
      if (a.grad == LossGrad::Write) z[i] = static_cast<T>(gs * d);
    }
    if (a.kl != nullptr) a.kl[r] = has_teacher ? tau * tau * kl : A(0);
  }
}

}  // namespace

void softmax_loss(const SoftmaxLossArgs<float>& a) { softmax_loss_impl(a); }
void softmax_loss(const SoftmaxLossArgs<double>& a) { softmax_loss_impl(a); }

}  // namespace qkd::cpu
