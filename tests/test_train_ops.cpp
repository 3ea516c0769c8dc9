// The training-only CPU ops (kernels/cpu): the fused softmax losses, L2 normalisation, fake quantization with LSQ
// scales and its int4 export, and the AdamW step with the gradient's sum of squares.
//
// Finite differences (softmax_loss, l2norm), in double: central differences with h = 1e-6 of a scalar loss
// summed in long double. Truncation h^2/6 |L'''| ~ 1e-12 for the O(1) logits used here; rounding eps_64 * |L| /
// 2h ~ 1e-10. kFdTol = 1e-6 relative to the largest |gradient| of the tensor (floor kFdFloor) leaves a wide
// margin, while a wrong term in a formula is an O(1) relative error. l2norm's backward reads the forward's norm
// rounded to fp32 (the header's type), a relative error of 2^-24 in dx: still 10x under kFdTol.
//
// Fake quantization has no true gradient (the STE and LSQ are estimators), so its backward is checked against the
// header's formulas, written out independently here in double; its forward and export are exact and compared
// bit for bit. AdamW is compared per element with the same update computed in double from the same fp32 state;
// the bound is a few fp32 roundings of the magnitudes involved (derived at the check).
#include <doctest/doctest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/adamw.h"
#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"
#include "kernels/l2norm.h"
#include "kernels/softmax_loss.h"

using namespace qkd;

namespace {

using Vec = std::vector<double>;

constexpr double kFdStep = 1e-6;
constexpr double kFdTol = 1e-6;
constexpr double kFdFloor = 1e-2;
constexpr double kU32 = 1.0 / (1 << 24);  // fp32 unit roundoff, 2^-24

Vec randn(std::mt19937& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

std::vector<float> randn_f(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Central differences of `loss` with respect to every param[i], compared to analytic[i]. Returns the error
// relative to the tensor's scale (largest |difference quotient|, at least kFdFloor) and CHECKs it.
double fd_check(const std::string& what, Vec& param, const Vec& analytic, const std::function<long double()>& loss,
                double step = kFdStep) {
  REQUIRE(param.size() == analytic.size());
  Vec fd(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    const double saved = param[i];
    param[i] = saved + step;
    const long double plus = loss();
    param[i] = saved - step;
    const long double minus = loss();
    param[i] = saved;
    fd[i] = static_cast<double>((plus - minus) / (2.0L * step));
  }
  double scale = kFdFloor, max_err = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < fd.size(); ++i) {
    scale = std::max(scale, std::fabs(fd[i]));
    const double err = std::fabs(analytic[i] - fd[i]);
    if (!(err <= max_err)) {  // also catches a NaN
      max_err = err;
      worst = i;
    }
  }
  const double rel = max_err / scale;
  INFO(what << ": max |analytic - fd| " << max_err << " at " << worst << " (analytic " << analytic[worst] << ", fd "
            << fd[worst] << "), scale " << scale << ", relative " << rel);
  CHECK(rel <= kFdTol);
  return rel;
}

// Runs with n OpenMP threads, then restores the previous count.
struct ThreadCount {
  int saved = omp_get_max_threads();
  explicit ThreadCount(int n) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;
};

template <typename F>
void throws_with(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    INFO("message: " << std::string(e.what()));
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
    return;
  }
  FAIL("no qkd::Error thrown; expected one mentioning '" << needle << "'");
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// ============================================================================================== softmax_loss

namespace {

struct LossCase {
  bool ce, kl;
  float temperature;
};

// Straightforward per-row ce and tau^2 KL in long double, for values checks.
void reference_losses(const Vec& z, const Vec& t, const std::vector<int32_t>& y, int rows, int vocab, int64_t ld,
                      double tau, Vec& ce, Vec& kl) {
  ce.assign(rows, 0.0);
  kl.assign(rows, 0.0);
  for (int r = 0; r < rows; ++r) {
    const double* zr = z.data() + r * ld;
    const double* tr = t.empty() ? nullptr : t.data() + r * ld;
    long double s = 0, ss = 0, st = 0;
    for (int i = 0; i < vocab; ++i) {
      s += std::exp(static_cast<long double>(zr[i]));
      ss += std::exp(static_cast<long double>(zr[i]) / tau);
      if (tr != nullptr) st += std::exp(static_cast<long double>(tr[i]) / tau);
    }
    if (!y.empty() && y[r] >= 0) ce[r] = static_cast<double>(std::log(s) - zr[y[r]]);
    if (tr != nullptr) {
      long double acc = 0;
      for (int i = 0; i < vocab; ++i) {
        const long double lpt = tr[i] / tau - std::log(st), lps = zr[i] / tau - std::log(ss);
        acc += std::exp(lpt) * (lpt - lps);
      }
      kl[r] = static_cast<double>(tau * tau * acc);
    }
  }
}

}  // namespace

TEST_CASE("softmax_loss: ce and KL values, gradient by finite differences, ignored targets, padded rows") {
  std::mt19937 rng(21);
  const int rows = 3, vocab = 7;
  const int64_t ld = 10;  // 3 padding columns that must stay untouched
  const double kPad = 777.0;
  const float ce_weight = 0.7f, kl_weight = 1.3f, grad_scale = 0.5f;
  double worst = 0.0;
  for (const LossCase lc : {LossCase{true, false, 1.0f}, LossCase{false, true, 1.0f}, LossCase{true, true, 1.0f},
                            LossCase{false, true, 2.5f}, LossCase{true, true, 0.6f}}) {
    Vec z0 = randn(rng, rows * ld, 2.0), t = randn(rng, rows * ld, 2.0);
    for (int r = 0; r < rows; ++r)
      for (int64_t i = vocab; i < ld; ++i) z0[r * ld + i] = t[r * ld + i] = kPad;
    const std::vector<int32_t> targets = {2, -1, 6};  // row 1 ignored
    auto args = [&](double* logits, double* ce, double* kl, LossGrad grad) {
      SoftmaxLossArgs<double> a{logits, lc.kl ? t.data() : nullptr, lc.ce ? targets.data() : nullptr, ce, kl,
                                rows, vocab, ld};
      a.temperature = lc.temperature;
      a.ce_weight = ce_weight;
      a.kl_weight = kl_weight;
      a.grad_scale = grad_scale;
      a.grad = grad;
      return a;
    };
    Vec z = z0, ce(rows, kPad), kl(rows, kPad);
    cpu::softmax_loss(args(z.data(), ce.data(), kl.data(), LossGrad::Write));
    const std::string tag = fmt::format("ce {} kl {} tau {}", lc.ce, lc.kl, lc.temperature);
    INFO(tag);

    Vec ce_ref, kl_ref;
    reference_losses(z0, lc.kl ? t : Vec{}, lc.ce ? targets : std::vector<int32_t>{}, rows, vocab, ld,
                     lc.temperature, ce_ref, kl_ref);
    for (int r = 0; r < rows; ++r) {
      CHECK(std::fabs(ce[r] - ce_ref[r]) <= 1e-12 * (1.0 + std::fabs(ce_ref[r])));
      CHECK(std::fabs(kl[r] - kl_ref[r]) <= 1e-12 * (1.0 + std::fabs(kl_ref[r])));
    }
    if (lc.ce) CHECK(ce[1] == 0.0);  // the ignored row
    if (!lc.ce) CHECK(ce[0] == 0.0);
    if (!lc.kl) CHECK(kl[0] == 0.0);
    for (int r = 0; r < rows; ++r)
      for (int64_t i = vocab; i < ld; ++i) CHECK(z[r * ld + i] == kPad);

    // The gradient of grad_scale * sum_r (ce_weight ce[r] + kl_weight kl[r]).
    auto loss = [&] {
      Vec zz = z0, c(rows), k(rows);
      cpu::softmax_loss(args(zz.data(), c.data(), k.data(), LossGrad::None));
      for (int64_t i = 0; i < rows * ld; ++i) REQUIRE(zz[i] == z0[i]);  // LossGrad::None leaves the logits alone
      long double l = 0;
      for (int r = 0; r < rows; ++r) l += static_cast<long double>(ce_weight) * c[r] + kl_weight * k[r];
      return grad_scale * l;
    };
    Vec dz = z;  // padding columns: no gradient, and FD gives 0 there too
    for (int r = 0; r < rows; ++r)
      for (int64_t i = vocab; i < ld; ++i) dz[r * ld + i] = 0.0;
    worst = std::max(worst, fd_check(tag + " dz", z0, dz, loss));
    if (lc.ce && !lc.kl) {
      for (int i = 0; i < vocab; ++i) CHECK(z[1 * ld + i] == 0.0);  // an ignored row without a teacher: dz = 0
    }
  }
  MESSAGE("softmax_loss finite differences: max relative error " << worst);
}

TEST_CASE("softmax_loss: KL and its gradient are exactly zero when the teacher is the student") {
  std::mt19937 rng(22);
  const int rows = 4, vocab = 1000;
  for (float tau : {1.0f, 2.0f, 0.7f}) {
    std::vector<float> z = randn_f(rng, static_cast<size_t>(rows) * vocab, 3.0f), t = z, kl(rows, -1.0f);
    SoftmaxLossArgs<float> a{z.data(), t.data(), nullptr, nullptr, kl.data(), rows, vocab, vocab};
    a.temperature = tau;
    a.ce_weight = 0.0f;
    a.kl_weight = 1.0f;
    cpu::softmax_loss(a);
    INFO("tau " << tau);
    for (int r = 0; r < rows; ++r) CHECK(kl[r] == 0.0f);
    CHECK(std::all_of(z.begin(), z.end(), [](float v) { return v == 0.0f; }));
  }
}

TEST_CASE("softmax_loss: the fp32 version against the fp64 one") {
  std::mt19937 rng(23);
  const int rows = 5, vocab = 300;
  const Vec z = randn(rng, rows * vocab, 3.0), t = randn(rng, rows * vocab, 3.0);
  const std::vector<int32_t> y = {0, 299, -1, 17, 150};
  Vec zd = z, ced(rows), kld(rows);
  std::vector<float> zf(z.begin(), z.end()), tf(t.begin(), t.end()), cef(rows), klf(rows);
  SoftmaxLossArgs<double> ad{zd.data(), t.data(), y.data(), ced.data(), kld.data(), rows, vocab, vocab, 1.7f, 1.0f,
                             0.5f, 0.25f};
  SoftmaxLossArgs<float> af{zf.data(), tf.data(), y.data(), cef.data(), klf.data(), rows, vocab, vocab, 1.7f, 1.0f,
                            0.5f, 0.25f};
  cpu::softmax_loss(ad);
  cpu::softmax_loss(af);
  // fp32 sums of 300 terms and a few roundings per term: 1e-5 of the magnitudes is METHOD.md's fp32 bound.
  for (int r = 0; r < rows; ++r) {
    CHECK(std::fabs(cef[r] - ced[r]) <= 1e-5 * (1.0 + std::fabs(ced[r])));
    CHECK(std::fabs(klf[r] - kld[r]) <= 1e-5 * (1.0 + std::fabs(kld[r])));
  }
  double max_err = 0.0;
  for (size_t i = 0; i < zd.size(); ++i) max_err = std::max(max_err, std::fabs(zf[i] - zd[i]));
  MESSAGE("softmax_loss fp32 vs fp64: max |dz error| " << max_err);
  CHECK(max_err <= 1e-6);  // |dz| <= 0.5 * (1 + 1.7): a few fp32 roundings of O(1) values
}

TEST_CASE("softmax_loss: bad arguments throw") {
  std::vector<float> z(20, 0.0f);
  const std::vector<int32_t> y = {3, 10};
  throws_with([&] { cpu::softmax_loss(SoftmaxLossArgs<float>{z.data(), nullptr, y.data(), nullptr, nullptr, 2, 10, 10}); },
              "target 10 of row 1");
  throws_with([&] { cpu::softmax_loss(SoftmaxLossArgs<float>{z.data(), nullptr, nullptr, nullptr, nullptr, 2, 10, 9}); },
              "ld 9");
  SoftmaxLossArgs<float> a{z.data(), nullptr, nullptr, nullptr, nullptr, 2, 10, 10};
  a.temperature = 0.0f;
  throws_with([&] { cpu::softmax_loss(a); }, "temperature 0");
}

// ==================================================================================================== l2norm

TEST_CASE("l2norm: forward values and backward by finite differences, including a clamped row") {
  std::mt19937 rng(31);
  const int rows = 3, dim = 6;
  const float eps = 1e-3f;
  Vec x0 = randn(rng, rows * dim);
  for (int i = 0; i < dim; ++i) x0[2 * dim + i] *= 1e-5;  // row 2: ||x|| ~ 2e-5 < eps, the clamped branch
  Vec dout = randn(rng, rows * dim);
  const Vec prior = randn(rng, rows * dim);
  for (int i = 0; i < dim; ++i) dout[2 * dim + i] *= eps;  // keeps the clamped row's dout / eps at O(1)
  Vec out(rows * dim);
  std::vector<float> norm(rows);
  cpu::l2norm_forward(L2NormArgs<double>{out.data(), norm.data(), x0.data(), rows, dim, eps});
  for (int r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) ss += x0[r * dim + i] * x0[r * dim + i];
    const double want = std::max(std::sqrt(ss), static_cast<double>(eps));
    CHECK(norm[r] == static_cast<float>(want));
    for (int i = 0; i < dim; ++i) CHECK(std::fabs(out[r * dim + i] - x0[r * dim + i] / want) <= 1e-15);
  }
  CHECK(norm[2] == eps);

  Vec dx = prior;
  cpu::l2norm_backward(L2NormBackwardArgs<double>{dx.data(), dout.data(), out.data(), norm.data(), x0.data(), rows,
                                                  dim, eps});
  for (size_t i = 0; i < dx.size(); ++i) dx[i] -= prior[i];  // accumulated onto the prior
  auto loss = [&] {
    Vec o(rows * dim);
    std::vector<float> nn(rows);
    cpu::l2norm_forward(L2NormArgs<double>{o.data(), nn.data(), x0.data(), rows, dim, eps});
    long double l = 0;
    for (size_t i = 0; i < o.size(); ++i) l += static_cast<long double>(dout[i]) * o[i];
    return l;
  };
  // The step stays far inside the clamped row's margin (||x|| 2e-5 vs eps 1e-3), and its map is linear there.
  const double rel = fd_check("l2norm dx", x0, dx, loss, 1e-7);
  MESSAGE("l2norm finite differences: max relative error " << rel);
}

TEST_CASE("l2norm: fp32 rows are unit vectors and the backward is orthogonal to them") {
  std::mt19937 rng(32);
  const int rows = 4, dim = 4096;
  const std::vector<float> x = randn_f(rng, static_cast<size_t>(rows) * dim), dout = randn_f(rng, x.size());
  std::vector<float> out(x.size()), norm(rows), dx(x.size(), 0.0f);
  cpu::l2norm_forward(L2NormArgs<float>{out.data(), norm.data(), x.data(), rows, dim});
  cpu::l2norm_backward(L2NormBackwardArgs<float>{dx.data(), dout.data(), out.data(), norm.data(), x.data(), rows, dim});
  for (int r = 0; r < rows; ++r) {
    double oo = 0.0, od = 0.0, dd = 0.0;
    for (int i = 0; i < dim; ++i) {
      oo += static_cast<double>(out[r * dim + i]) * out[r * dim + i];
      od += static_cast<double>(out[r * dim + i]) * dx[r * dim + i];
      dd += static_cast<double>(dx[r * dim + i]) * dx[r * dim + i];
    }
    CHECK(std::fabs(oo - 1.0) <= 1e-5);
    CHECK(std::fabs(od) <= 1e-5 * std::sqrt(dd));  // d ||x / ||x|| || = 0 along x
  }
}

// ================================================================================================ fake_quant

namespace {

struct Grid {
  int qmin, qmax;
};
Grid grid(int bits) { return {-(1 << (bits - 1)), (1 << (bits - 1)) - 1}; }

// Round half to even written out with floor, not with the library's rint.
double round_half_even_ref(double x) {
  const double f = std::floor(x), d = x - f;
  if (d > 0.5) return f + 1.0;
  if (d < 0.5) return f;
  return std::fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}

float effective_scale(float s, float gamma) { return bf16_to_float(float_to_bf16(gamma * s)); }

// Random scales around the 4-bit round-to-nearest ones, scaled for `bits`, with some signs flipped: the int4
// rule itself yields negative scales (x_ext / qmin), and the formulas must hold for them too.
std::vector<float> random_scales(std::mt19937& rng, const std::vector<float>& w, int n, int k, int gs, int bits) {
  std::vector<float> s(static_cast<size_t>(n) * (k / gs));
  cpu::fake_quant_init_scales(w.data(), n, k, gs, bits, s.data());
  std::uniform_real_distribution<float> jitter(0.7f, 1.3f);
  std::bernoulli_distribution flip(0.2);
  for (float& v : s) v *= flip(rng) ? -jitter(rng) : jitter(rng);
  return s;
}

}  // namespace

TEST_CASE("fake_quant_forward: values against the formula, ties to even, clamping, zero scales") {
  std::mt19937 rng(41);
  const int n = 4, k = 64, gs = 32, groups = k / gs;
  for (int bits : {2, 3, 4, 8}) {
    for (bool with_clip : {false, true}) {
      const Grid g = grid(bits);
      std::vector<float> w = randn_f(rng, static_cast<size_t>(n) * k);
      std::vector<float> scale = random_scales(rng, w, n, k, gs, bits);
      const float gamma = 0.87f;
      const float* clip = with_clip ? &gamma : nullptr;
      const float gm = with_clip ? gamma : 1.0f;
      // Row 0 group 0: exact half-integer multiples of s_e from below qmin to above qmax (s_e has 8 significant
      // bits, so s_e * (m / 2) is exact and w / s_e is exactly m / 2): ties and both clamps.
      const float se0 = effective_scale(scale[0], gm);
      for (int j = 0; j < gs; ++j) w[j] = se0 * (static_cast<float>(g.qmin) - 2.0f + 0.5f * static_cast<float>(j));
      // Row 1 group 1: a zero scale puts every weight on 0.
      scale[1 * groups + 1] = 0.0f;
      std::vector<float> wq(w.size(), -1.0f);
      cpu::fake_quant_forward(FakeQuantArgs<float>{wq.data(), w.data(), scale.data(), clip, n, k, gs, bits});
      int ties = 0, clamped = 0;
      for (int r = 0; r < n; ++r) {
        for (int c = 0; c < k; ++c) {
          const size_t i = static_cast<size_t>(r) * k + c;
          const float s_e = effective_scale(scale[static_cast<size_t>(r) * groups + c / gs], gm);
          double q = 0.0;
          if (s_e != 0.0f) {
            const double v = static_cast<double>(w[i] / s_e);  // v in fp32, as the header defines it
            if (v - std::floor(v) == 0.5) ++ties;
            q = std::clamp(round_half_even_ref(v), static_cast<double>(g.qmin), static_cast<double>(g.qmax));
            if (v < g.qmin || v > g.qmax) ++clamped;
          }
          const double want = static_cast<double>(s_e) * q;
          if (static_cast<double>(wq[i]) != want) {
            FAIL_CHECK("bits " << bits << " clip " << with_clip << " [" << r << ", " << c << "]: wq " << wq[i]
                               << " want " << want << " (w " << w[i] << ", s_e " << s_e << ")");
          }
        }
      }
      CHECK(ties > 0);
      CHECK(clamped > 0);
      for (int c = gs; c < 2 * gs; ++c) CHECK(wq[static_cast<size_t>(k) + c] == 0.0f);
    }
  }
}

TEST_CASE("fake_quant_backward: STE mask, LSQ scale gradient and dclip against the formulas in double") {
  std::mt19937 rng(42);
  const int n = 3, k = 256;
  double worst_ds = 0.0;
  for (int gs : {32, 128, 256}) {
    for (int bits : {2, 4, 8}) {
      for (bool with_clip : {false, true}) {
        const Grid g = grid(bits);
        const int groups = k / gs;
        const size_t nk = static_cast<size_t>(n) * k;
        const std::vector<float> w = randn_f(rng, nk), dwq = randn_f(rng, nk);
        std::vector<float> scale = random_scales(rng, w, n, k, gs, bits);
        for (float& s : scale) s *= 0.8f;  // some weights out of range: both branches of the estimator
        const float gamma = 1.1f;
        const float* clip = with_clip ? &gamma : nullptr;
        const float gm = with_clip ? gamma : 1.0f;
        std::vector<float> dw(nk, -7.0f), dscale(scale.size(), -7.0f);
        const float dclip_prior = 0.25f;
        float dclip = dclip_prior;
        cpu::fake_quant_backward(FakeQuantBackwardArgs{dw.data(), dscale.data(), with_clip ? &dclip : nullptr,
                                                       dwq.data(), w.data(), scale.data(), clip, n, k, gs, bits});
        const double lsq = 1.0 / std::sqrt(static_cast<double>(gs) * g.qmax);
        double clip_ref = 0.0, clip_bound = 0.0;
        int outside = 0;
        for (int r = 0; r < n; ++r) {
          for (int gi = 0; gi < groups; ++gi) {
            const size_t si = static_cast<size_t>(r) * groups + gi;
            const float s_e = effective_scale(scale[si], gm);
            double sum = 0.0, mag = 0.0;
            for (int c = gi * gs; c < (gi + 1) * gs; ++c) {
              const size_t i = static_cast<size_t>(r) * k + c;
              // q and the range test from v in fp32, as the header defines them (a double v could round the
              // other way at a tie); the estimator's terms from v in double.
              const float v_f = w[i] / s_e;
              const double v = static_cast<double>(w[i]) / s_e;
              const double q = std::clamp(round_half_even_ref(v_f), static_cast<double>(g.qmin),
                                          static_cast<double>(g.qmax));
              const bool in = v_f >= static_cast<float>(g.qmin) && v_f <= static_cast<float>(g.qmax);
              outside += !in;
              CHECK(dw[i] == (in ? dwq[i] : 0.0f));
              sum += static_cast<double>(dwq[i]) * (in ? q - v : q);
              mag += std::fabs(dwq[i]) * (std::fabs(v) + 1.0);
            }
            const double ds_e = lsq * sum;
            // The op forms v in fp32 (error <= 2^-24 |v| per term) and rounds dscale to fp32 once.
            const double bound = gm * lsq * mag * kU32 * 2.0 + std::fabs(gm * ds_e) * kU32 * 2.0;
            const double err = std::fabs(dscale[si] - gm * ds_e);
            worst_ds = std::max(worst_ds, err / std::max(bound, 1e-30));
            INFO("gs " << gs << " bits " << bits << " clip " << with_clip << " row " << r << " group " << gi);
            CHECK(err <= bound);
            // the clip factor's gradient carries no LSQ scale: dclip += s * dL/ds_e
            clip_ref += static_cast<double>(scale[si]) * sum;
            clip_bound += std::fabs(scale[si]) * (mag * kU32 * 2.0);
          }
        }
        CHECK(outside > 0);
        if (with_clip) {
          const double want = dclip_prior + clip_ref;
          const double bound = clip_bound + (std::fabs(clip_ref) + dclip_prior) * kU32 * 2.0;
          INFO("dclip " << dclip << " want " << want << " bound " << bound);
          CHECK(std::fabs(dclip - want) <= bound);
        }
      }
    }
  }
  MESSAGE("fake_quant_backward: max dscale error / bound " << worst_ds);
}

TEST_CASE("fake_quant_backward: dw may alias dwq; the result does not depend on the thread count") {
  std::mt19937 rng(43);
  const int n = 37, k = 384, gs = 128, bits = 3;
  const size_t nk = static_cast<size_t>(n) * k;
  const std::vector<float> w = randn_f(rng, nk), dwq = randn_f(rng, nk);
  const std::vector<float> scale = random_scales(rng, w, n, k, gs, bits);
  const float gamma = 0.9f;
  auto run = [&](int threads, bool alias, std::vector<float>& dw, std::vector<float>& dscale, float& dclip) {
    ThreadCount tc(threads);
    dw = alias ? dwq : std::vector<float>(nk, 0.0f);
    dscale.assign(scale.size(), 0.0f);
    dclip = 0.0f;
    cpu::fake_quant_backward(FakeQuantBackwardArgs{dw.data(), dscale.data(), &dclip, alias ? dw.data() : dwq.data(),
                                                   w.data(), scale.data(), &gamma, n, k, gs, bits});
  };
  std::vector<float> dw1, ds1, dw2, ds2, dw3, ds3;
  float c1 = 0, c2 = 0, c3 = 0;
  run(1, false, dw1, ds1, c1);
  run(4, false, dw2, ds2, c2);
  run(3, true, dw3, ds3, c3);
  CHECK(same_bits(dw1, dw2));
  CHECK(same_bits(ds1, ds2));
  CHECK(c1 == c2);
  CHECK(same_bits(dw1, dw3));
  CHECK(same_bits(ds1, ds3));
  CHECK(c1 == c3);
}

TEST_CASE("fake_quant_export: the int4 weight dequantizes to the forward's wq exactly") {
  std::mt19937 rng(44);
  struct Shape {
    int k, gs;
  };
  for (Shape sh : {Shape{256, 32}, Shape{256, 64}, Shape{256, 128}, Shape{256, 256}, Shape{96, 96}}) {
    for (int bits : {2, 3, 4}) {
      for (bool with_clip : {false, true}) {
        const int n = 5;
        const Grid g = grid(bits);
        const std::vector<float> w = randn_f(rng, static_cast<size_t>(n) * sh.k);
        const std::vector<float> scale = random_scales(rng, w, n, sh.k, sh.gs, bits);
        const float gamma = 0.93f;
        const float* clip = with_clip ? &gamma : nullptr;
        std::vector<float> wq(w.size());
        cpu::fake_quant_forward(FakeQuantArgs<float>{wq.data(), w.data(), scale.data(), clip, n, sh.k, sh.gs, bits});
        const Int4HostWeight q = cpu::fake_quant_export(w.data(), scale.data(), clip, n, sh.k, sh.gs, bits);
        INFO("k " << sh.k << " gs " << sh.gs << " bits " << bits << " clip " << with_clip);
        CHECK_NOTHROW(int4_check(q.view(), "export"));
        CHECK(q.sym == Int4Symmetry::Symmetric);
        CHECK(q.scale_type == ScaleType::BF16);
        CHECK(q.group_size == sh.gs);
        std::vector<uint8_t> u(w.size());
        int4_unpack(q.packed.data(), n, sh.k, u.data());
        for (uint8_t v : u) {
          REQUIRE(static_cast<int>(v) - kInt4Zero >= g.qmin);
          REQUIRE(static_cast<int>(v) - kInt4Zero <= g.qmax);
        }
        std::vector<float> deq(w.size());
        cpu::dequantize_int4(q.view(), deq.data());
        CHECK(same_bits(deq, wq));
      }
    }
  }
}

TEST_CASE("fake_quant_init_scales: 4 bits reproduces int4_quantize bit for bit, and export reproduces its codes") {
  std::mt19937 rng(45);
  struct Shape {
    int k, gs;
  };
  int negative = 0;
  for (Int4ScaleSearch search : {Int4ScaleSearch::None, Int4ScaleSearch::ClipMse})
  for (Shape sh : {Shape{256, 32}, Shape{256, 64}, Shape{256, 128}, Shape{256, 256}, Shape{96, 96}}) {
    const int n = 6;
    std::vector<float> w = randn_f(rng, static_cast<size_t>(n) * sh.k);
    for (int c = 0; c < sh.gs; ++c) w[static_cast<size_t>(1) * sh.k + c] = 0.0f;  // an all-zero group: scale 0
    for (int r = 2; r < n; ++r) w[static_cast<size_t>(r) * sh.k + 3] = 6.0f;   // outliers: x_ext / -8 may win
    std::vector<float> scale(static_cast<size_t>(n) * (sh.k / sh.gs));
    cpu::fake_quant_init_scales(w.data(), n, sh.k, sh.gs, 4, scale.data(), search);
    const Int4HostWeight ref =
        int4_quantize(w.data(), n, sh.k, sh.gs, Int4Symmetry::Symmetric, ScaleType::BF16, search);
    INFO("k " << sh.k << " gs " << sh.gs << " clip search " << (search == Int4ScaleSearch::ClipMse));
    REQUIRE(ref.scales.size() == scale.size());
    for (size_t i = 0; i < scale.size(); ++i) {
      CHECK(float_to_bf16(scale[i]) == ref.scales[i]);
      CHECK(bf16_to_float(ref.scales[i]) == scale[i]);
      negative += scale[i] < 0.0f;
    }
    const Int4HostWeight q = cpu::fake_quant_export(w.data(), scale.data(), nullptr, n, sh.k, sh.gs, 4);
    CHECK(q.packed == ref.packed);
    CHECK(q.scales == ref.scales);
  }
  CHECK(negative > 0);  // the x_ext / qmin candidate was taken somewhere
}

TEST_CASE("fake_quant_init_scales: other bit widths keep the better of the two candidates") {
  std::mt19937 rng(46);
  const int n = 8, k = 128, gs = 32;
  for (int bits : {2, 3, 5, 8}) {
    const Grid g = grid(bits);
    const std::vector<float> w = randn_f(rng, static_cast<size_t>(n) * k);
    std::vector<float> scale(static_cast<size_t>(n) * (k / gs));
    cpu::fake_quant_init_scales(w.data(), n, k, gs, bits, scale.data());
    auto sse = [&](const float* x, float s) {
      double e2 = 0.0;
      for (int i = 0; i < gs; ++i) {
        const double q = std::clamp(round_half_even_ref(static_cast<double>(x[i] / s)), static_cast<double>(g.qmin),
                                    static_cast<double>(g.qmax));
        e2 += (x[i] - s * q) * (x[i] - s * q);
      }
      return e2;
    };
    for (int r = 0; r < n; ++r) {
      for (int gi = 0; gi < k / gs; ++gi) {
        const float* x = w.data() + static_cast<size_t>(r) * k + gi * gs;
        float amax = 0.0f, ext = 0.0f;
        for (int i = 0; i < gs; ++i) {
          if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            ext = x[i];
          }
        }
        const float c1 = bf16_to_float(float_to_bf16(amax / g.qmax)), c2 = bf16_to_float(float_to_bf16(ext / g.qmin));
        const float s = scale[static_cast<size_t>(r) * (k / gs) + gi];
        INFO("bits " << bits << " row " << r << " group " << gi << ": s " << s << ", candidates " << c1 << " " << c2);
        CHECK((s == c1 || s == c2));
        CHECK(sse(x, s) <= std::min(sse(x, c1), sse(x, c2)));
      }
    }
  }
}

TEST_CASE("fake_quant: bad arguments throw messages that name the value") {
  std::vector<float> w(4 * 128, 0.5f), s(4 * 4, 0.1f), wq(w.size()), dw(w.size()), ds(s.size());
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 4, 128, 32, 1}); }, "bits 1");
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 4, 128, 32, 9}); }, "bits 9");
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 4, 96, 64, 4}); },
              "not a multiple of group_size 64");
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 4, 48, 48, 4}); }, "k 48");
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 4, 128, 0, 4}); },
              "group_size 0");
  throws_with([&] { cpu::fake_quant_forward({wq.data(), w.data(), s.data(), nullptr, 0, 128, 32, 4}); }, "n 0");
  throws_with([&] { cpu::fake_quant_check(4, 128, 48, 4, "my_layer"); }, "my_layer: group_size 48");
  throws_with(
      [&] {
        cpu::fake_quant_backward({dw.data(), ds.data(), ds.data(), dw.data(), w.data(), s.data(), nullptr, 4, 128, 32,
                                  4});
      },
      "dclip is given but clip is null");
  throws_with([&] { cpu::fake_quant_export(w.data(), s.data(), nullptr, 4, 128, 32, 5); }, "bits 5");
  throws_with([&] { cpu::fake_quant_init_scales(w.data(), 4, 128, 32, 1, s.data()); }, "bits 1");
  {
    std::vector<float> bad = w;
    bad[2 * 128 + 5] = NAN;
    throws_with([&] { cpu::fake_quant_init_scales(bad.data(), 4, 128, 32, 4, s.data()); }, "[2, 5]");
    throws_with([&] { cpu::fake_quant_export(bad.data(), s.data(), nullptr, 4, 128, 32, 4); }, "[2, 5]");
  }
  {
    std::vector<float> big = s;
    big[6] = 3e38f;
    const float gamma = 2.0f;
    throws_with([&] { cpu::fake_quant_export(w.data(), big.data(), &gamma, 4, 128, 32, 4); }, "row 1 group 2");
  }
}

// ===================================================================================================== adamw

namespace {

struct AdamWRef {
  Vec p, m, v;
};

// The update in double from the same fp32 state and constants (beta_i and 1 - beta_i are the fp32 values).
AdamWRef adamw_ref(const AdamWArgs& a, const std::vector<float>& p, const std::vector<float>& m,
                   const std::vector<float>& v, const std::vector<float>& grad) {
  AdamWRef r{Vec(p.size()), Vec(p.size()), Vec(p.size())};
  const double b1 = a.beta1, b2 = a.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(a.step)), bc2 = 1.0 - std::pow(b2, static_cast<double>(a.step));
  for (size_t i = 0; i < p.size(); ++i) {
    const double g = static_cast<double>(a.grad_scale) * grad[i];
    r.m[i] = b1 * m[i] + (1.0 - b1) * g;
    r.v[i] = b2 * v[i] + (1.0 - b2) * g * g;
    r.p[i] = p[i] - a.lr * ((r.m[i] / bc1) / (std::sqrt(r.v[i] / bc2) + a.eps) + a.weight_decay * static_cast<double>(p[i]));
  }
  return r;
}

// One step of cpu::adamw_update on (p, m, v) against adamw_ref. Bounds: m and v take 3-4 fp32 roundings
// (products, sum, and the scaled gradient): |err| <= 4 u (|beta m| + |(1 - beta) g|) with u = 2^-24 (g^2 for v).
// The update term takes about 8 roundings (the moments' errors included, the bias corrections, the division,
// the sqrt, the eps and decay adds): relative 16 u of its terms' magnitudes, times lr; p then rounds once more.
double adamw_step_check(AdamWArgs a, std::vector<float>& p, std::vector<float>& m, std::vector<float>& v,
                        const std::vector<float>& grad, std::vector<uint16_t>* bf16_copy) {
  const AdamWRef ref = adamw_ref(a, p, m, v, grad);
  const std::vector<float> p0 = p, m0 = m, v0 = v;
  a.param = p.data();
  a.m = m.data();
  a.v = v.data();
  a.grad = grad.data();
  a.n = static_cast<int64_t>(p.size());
  a.param_bf16 = bf16_copy != nullptr ? reinterpret_cast<__nv_bfloat16*>(bf16_copy->data()) : nullptr;
  cpu::adamw_update(a);
  const double b1 = a.beta1, b2 = a.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(a.step)), bc2 = 1.0 - std::pow(b2, static_cast<double>(a.step));
  double worst = 0.0;
  int bad = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double g = std::fabs(static_cast<double>(a.grad_scale) * grad[i]);
    const double bm = 4 * kU32 * (std::fabs(b1 * m0[i]) + (1 - b1) * g);
    const double bv = 4 * kU32 * (b2 * v0[i] + (1 - b2) * g * g);
    const double step = std::fabs(ref.m[i] / bc1) / (std::sqrt(ref.v[i] / bc2) + a.eps);
    const double bp = kU32 * std::fabs(ref.p[i]) + a.lr * 16 * kU32 * (step + std::fabs(a.weight_decay * p0[i])) +
                      kU32 * std::fabs(p0[i]);
    const double em = std::fabs(m[i] - ref.m[i]), ev = std::fabs(v[i] - ref.v[i]), ep = std::fabs(p[i] - ref.p[i]);
    worst = std::max({worst, em / std::max(bm, 1e-300), ev / std::max(bv, 1e-300), ep / std::max(bp, 1e-300)});
    if (!(em <= bm && ev <= bv && ep <= bp)) {
      if (bad < 5) {
        MESSAGE(fmt::format("[{}] p {} want {} (bound {:.3g}); m {} want {} ({:.3g}); v {} want {} ({:.3g})", i, p[i],
                            ref.p[i], bp, m[i], ref.m[i], bm, v[i], ref.v[i], bv));
      }
      ++bad;
    }
    if (bf16_copy != nullptr) CHECK((*bf16_copy)[i] == float_to_bf16(p[i]));
  }
  CHECK(bad == 0);
  return worst;
}

}  // namespace

TEST_CASE("adamw_update: steps against the update in double, with weight decay, grad_scale and the bf16 copy") {
  std::mt19937 rng(51);
  const int n = 37;
  std::vector<float> p = randn_f(rng, n, 0.05f), m = randn_f(rng, n, 1e-3f), v = randn_f(rng, n, 1e-3f);
  for (float& x : v) x = x * x;
  std::vector<uint16_t> copy(n, 0xffff);
  AdamWArgs a{};
  a.lr = 1e-3f;
  a.beta1 = 0.9f;
  a.beta2 = 0.95f;
  a.eps = 1e-8f;
  a.weight_decay = 0.1f;
  a.grad_scale = 0.5f;
  double worst = 0.0;
  for (int64_t step = 7; step < 12; ++step) {  // several steps from a mid-training state
    a.step = step;
    worst = std::max(worst, adamw_step_check(a, p, m, v, randn_f(rng, n, 1e-2f), &copy));
  }
  MESSAGE("adamw_update: max error / bound " << worst);
}

TEST_CASE("adamw_update: the first step moves each weight by lr against its gradient's sign; decay alone shrinks") {
  std::mt19937 rng(52);
  const int n = 64;
  const std::vector<float> p0 = randn_f(rng, n), grad = randn_f(rng, n);
  std::vector<float> p = p0, m(n, 0.0f), v(n, 0.0f);
  AdamWArgs a{p.data(), nullptr, m.data(), v.data(), grad.data(), n, 1e-2f, 0.9f, 0.999f, 1e-12f, 0.0f};
  cpu::adamw_update(a);
  // m / bc1 = g and v / bc2 = g^2 up to rounding, so the step is lr * g / |g| = lr * sign(g).
  for (int i = 0; i < n; ++i) CHECK(std::fabs(p[i] - (p0[i] - 1e-2 * (grad[i] > 0 ? 1 : -1))) <= 1e-6);

  std::vector<float> q = p0, mz(n, 0.0f), vz(n, 0.0f), zero(n, 0.0f);
  AdamWArgs d{q.data(), nullptr, mz.data(), vz.data(), zero.data(), n, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.5f};
  d.step = 3;
  cpu::adamw_update(d);
  for (int i = 0; i < n; ++i) CHECK(std::fabs(q[i] - p0[i] * (1.0 - 1e-2 * 0.5)) <= 2 * kU32 * std::fabs(p0[i]));

  // grad_scale multiplies the gradient before anything else: (2 g, 0.5) is (g, 1) bit for bit.
  std::vector<float> g2(n), pa = p0, pb = p0, ma(n, 0.01f), mb = ma, va(n, 1e-4f), vb = va;
  for (int i = 0; i < n; ++i) g2[i] = 2.0f * grad[i];
  AdamWArgs sa{pa.data(), nullptr, ma.data(), va.data(), grad.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  AdamWArgs sb{pb.data(), nullptr, mb.data(), vb.data(), g2.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f};
  sa.step = sb.step = 4;
  cpu::adamw_update(sa);
  cpu::adamw_update(sb);
  CHECK(same_bits(pa, pb));
  CHECK(same_bits(ma, mb));
  CHECK(same_bits(va, vb));
}

TEST_CASE("adamw_update: bad arguments throw") {
  std::vector<float> p(4), m(4), v(4), g(4);
  AdamWArgs a{p.data(), nullptr, m.data(), v.data(), g.data(), 4, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f};
  a.step = 0;
  throws_with([&] { cpu::adamw_update(a); }, "step 0");
  a.step = 1;
  a.beta2 = 1.0f;
  throws_with([&] { cpu::adamw_update(a); }, "beta2 1");
}

TEST_CASE("sum_squares: against a long double sum, and the same bits for any thread count") {
  std::mt19937 rng(53);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{200003}}) {
    const std::vector<float> x = randn_f(rng, static_cast<size_t>(n), 3.0f);
    long double ref = 0.0L;
    for (float f : x) ref += static_cast<long double>(f) * f;
    double s1 = 0.0, s4 = 0.0;
    {
      ThreadCount tc(1);
      s1 = cpu::sum_squares(x.data(), n);
    }
    {
      ThreadCount tc(4);
      s4 = cpu::sum_squares(x.data(), n);
    }
    INFO("n " << n);
    CHECK(s1 == s4);
    // n fp64 additions of positive terms: relative error below n * 2^-53 (~2e-11 at n = 200003).
    CHECK(std::fabs(s1 - static_cast<double>(ref)) <= static_cast<double>(n) * 1.2e-16 * static_cast<double>(ref));
  }
}
