// Backward passes of the CPU reference ops (kernels/cpu), three ways:
//  1. Finite differences in double on tiny shapes. For a random projection L = sum(dout * f(inputs)) the
//     analytic gradient of every input is compared to the central difference (L(p + h) - L(p - h)) / 2h.
//  2. The fp32 overload against the fp64 one (or a naive double loop) on the same fp32-rounded inputs.
//  3. Semantics: += really adds onto what is there, = ignores it, rejected arguments throw, and the result is
//     the same bits whatever the thread count (the trainer relies on run-to-run reproducibility).
//
// Finite-difference bound. h = 1e-6. Truncation error of the central difference: h^2/6 |L'''| ~ 2e-13 for the
// O(1) inputs used here. Rounding: L is summed in long double, so the outputs that do not depend on the
// perturbed element are the same bits in both evaluations and cancel exactly; the ones that do carry fp64
// rounding, eps_64 * sum|dout * out| ~ 1e-16 * 100 at most, divided by 2h: ~5e-9. The fp64 analytic gradients
// are exact to ~1e-15, except rmsnorm's, which uses the forward's fp32 rstd (relative 3e-8, half an fp32 ulp).
// So the difference is below ~1e-7 of the gradient's scale, and kFdTol = 1e-6 relative to the largest
// |gradient| of the tensor (floor kFdFloor for tensors that are exactly zero, e.g. dq at seq_len 1) leaves 10x
// margin, while a wrong term in a formula is an O(1) relative error.
//
// fp32 bound: |fp32 - fp64| <= kFp32Tol * mag, where mag is the sum of the magnitudes that flow into each
// result (as in test_cpu_ops.cpp). kFp32Tol = 1e-5 is METHOD.md's fp32 bound: fp32 rounding (6e-8) times the
// short reduction lengths and the handful of roundings per term used here.
#include <doctest/doctest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/attention.h"
#include "kernels/embedding.h"
#include "kernels/error.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"

namespace {

using Vec = std::vector<double>;

constexpr double kFdStep = 1e-6;
constexpr double kFdTol = 1e-6;
constexpr double kFdFloor = 1e-2;
constexpr double kFp32Tol = 1e-5;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

Vec randn(std::mt19937& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

std::vector<float> to_float(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }
Vec to_double(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// The projection L = sum(dout * out), in long double so that unaffected outputs cancel exactly (file comment).
long double project(const Vec& dout, const Vec& out) {
  REQUIRE(dout.size() == out.size());
  long double s = 0.0L;
  for (size_t i = 0; i < out.size(); ++i) s += static_cast<long double>(dout[i]) * out[i];
  return s;
}

std::vector<size_t> all_indices(size_t n) {
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  return idx;
}

// Central differences of `loss` with respect to param[idx[e]], compared to analytic[e]. Returns the error
// relative to the tensor's scale (largest |difference quotient|, at least kFdFloor) and CHECKs it.
double fd_check(const std::string& what, Vec& param, const std::vector<size_t>& idx, const Vec& analytic,
                const std::function<long double()>& loss) {
  REQUIRE(idx.size() == analytic.size());
  Vec fd(idx.size());
  for (size_t e = 0; e < idx.size(); ++e) {
    const double saved = param[idx[e]];
    param[idx[e]] = saved + kFdStep;
    const long double plus = loss();
    param[idx[e]] = saved - kFdStep;
    const long double minus = loss();
    param[idx[e]] = saved;
    fd[e] = static_cast<double>((plus - minus) / (2.0L * kFdStep));
  }
  double scale = kFdFloor, max_err = 0.0;
  size_t worst = 0;
  for (size_t e = 0; e < fd.size(); ++e) {
    scale = std::max(scale, std::fabs(fd[e]));
    const double err = std::fabs(analytic[e] - fd[e]);
    if (!(err <= max_err)) {  // also catches a NaN
      max_err = err;
      worst = e;
    }
  }
  const double rel = max_err / scale;
  INFO(what << ": max |analytic - fd| " << max_err << " at " << worst << " (analytic " << analytic[worst] << ", fd "
            << fd[worst] << "), scale " << scale << ", relative " << rel);
  CHECK(rel <= kFdTol);
  return rel;
}

double fd_check(const std::string& what, Vec& param, const Vec& analytic, const std::function<long double()>& loss) {
  return fd_check(what, param, all_indices(param.size()), analytic, loss);
}

// |got - ref| <= tol * mag element by element; reports the worst and the first mismatches. Returns max err/mag.
double expect_close(const std::string& what, const std::vector<float>& got, const Vec& ref, const Vec& mag,
                    double tol = kFp32Tol) {
  REQUIRE(got.size() == ref.size());
  REQUIRE(mag.size() == ref.size());
  double max_rel = 0.0;
  int bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    max_rel = std::max(max_rel, err / (mag[i] + 1e-30));
    if (!(err <= tol * mag[i] + 1e-30)) {
      if (bad < 5) first += fmt::format("  [{}] got {} want {} (bound {:.3g})\n", i, got[i], ref[i], tol * mag[i]);
      ++bad;
    }
  }
  INFO(what << ": max err/mag " << max_rel << ", " << bad << " of " << got.size() << " outside the bound\n"
            << first);
  CHECK(bad == 0);
  return max_rel;
}

// Runs f with n OpenMP threads, then restores the previous count.
struct ThreadCount {
  int saved = omp_get_max_threads();
  explicit ThreadCount(int n) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;
};

template <typename F>
auto with_threads(int n, F&& f) {
  ThreadCount tc(n);
  return f();
}

// ---- rmsnorm ----

TEST_CASE("rmsnorm_backward: finite differences in double") {
  std::mt19937 rng(11);
  const float eps = 1e-5f;
  double worst = 0.0;
  for (int rows : {1, 3}) {
    for (int dim : {4, 7, 16}) {
      for (bool fused : {false, true}) {
        const size_t n = static_cast<size_t>(rows) * dim;
        Vec x0 = randn(rng, n), add = randn(rng, n), weight = randn(rng, dim, 0.5), dout = randn(rng, n);
        for (double& w : weight) w += 1.0;
        Vec x = x0, out(n);
        std::vector<float> rstd(rows);
        qkd::cpu::rmsnorm_forward(
            {out.data(), x.data(), fused ? add.data() : nullptr, weight.data(), rstd.data(), rows, dim, eps});
        Vec dx(n, 0.0), dweight(dim, 0.0);
        qkd::cpu::rmsnorm_backward({dx.data(), dweight.data(), dout.data(), x.data(), weight.data(), rstd.data(),
                                    rows, dim});
        auto loss = [&] {
          Vec xs = x0, o(n);
          qkd::cpu::rmsnorm_forward(
              {o.data(), xs.data(), fused ? add.data() : nullptr, weight.data(), nullptr, rows, dim, eps});
          return project(dout, o);
        };
        const std::string tag = fmt::format("rmsnorm rows {} dim {} fused {}", rows, dim, fused);
        worst = std::max(worst, fd_check(tag + " dx", x0, dx, loss));
        if (fused) worst = std::max(worst, fd_check(tag + " dx (as d add)", add, dx, loss));
        worst = std::max(worst, fd_check(tag + " dweight", weight, dweight, loss));
      }
    }
  }
  MESSAGE("rmsnorm finite differences: max relative error " << worst);
}

TEST_CASE("rmsnorm_backward: dx and dweight accumulate; a frozen weight skips dweight") {
  std::mt19937 rng(12);
  const int rows = 5, dim = 70;  // two dweight column strips
  const size_t n = static_cast<size_t>(rows) * dim;
  const auto x = to_float(randn(rng, n)), weight = to_float(randn(rng, dim)), dout = to_float(randn(rng, n));
  const auto dx_prior = to_float(randn(rng, n)), dw_prior = to_float(randn(rng, dim));
  std::vector<float> xs = x, out(n), rstd(rows);
  qkd::cpu::rmsnorm_forward({out.data(), xs.data(), nullptr, weight.data(), rstd.data(), rows, dim, 1e-5f});

  std::vector<float> dx0(n, 0.0f), dw0(dim, 0.0f);
  qkd::cpu::rmsnorm_backward({dx0.data(), dw0.data(), dout.data(), x.data(), weight.data(), rstd.data(), rows, dim});
  std::vector<float> dx = dx_prior, dw = dw_prior;
  qkd::cpu::rmsnorm_backward({dx.data(), dw.data(), dout.data(), x.data(), weight.data(), rstd.data(), rows, dim});
  // Each element gets one `+= term`, so the result is exactly prior + term.
  for (size_t i = 0; i < n; ++i) REQUIRE(dx[i] == dx_prior[i] + dx0[i]);
  for (int i = 0; i < dim; ++i) REQUIRE(dw[i] == dw_prior[i] + dw0[i]);

  std::vector<float> dx_frozen(n, 0.0f);
  qkd::cpu::rmsnorm_backward({dx_frozen.data(), nullptr, dout.data(), x.data(), weight.data(), rstd.data(), rows, dim});
  CHECK(dx_frozen == dx0);
}

TEST_CASE("rmsnorm_backward: fp32 agrees with fp64 and does not depend on the thread count") {
  std::mt19937 rng(13);
  double worst = 0.0;
  for (int rows : {1, 5, 40}) {
    for (int dim : {64, 300}) {
      const size_t n = static_cast<size_t>(rows) * dim;
      const auto xf = to_float(randn(rng, n, 2.0)), wf = to_float(randn(rng, dim)), df = to_float(randn(rng, n));
      std::vector<float> xs = xf, out(n), rstd(rows);
      qkd::cpu::rmsnorm_forward({out.data(), xs.data(), nullptr, wf.data(), rstd.data(), rows, dim, 1e-5f});
      auto run = [&] {
        std::vector<float> dx(n, 0.0f), dw(dim, 0.0f);
        qkd::cpu::rmsnorm_backward({dx.data(), dw.data(), df.data(), xf.data(), wf.data(), rstd.data(), rows, dim});
        dx.insert(dx.end(), dw.begin(), dw.end());
        return dx;
      };
      const auto got1 = with_threads(1, run), got = with_threads(3, run);
      CHECK(got1 == got);

      // fp64 on the same inputs; the forward's fp32 rstd is the same value in both (it is rounded from double).
      const Vec x = to_double(xf), w = to_double(wf), d = to_double(df);
      Vec dx(n, 0.0), dw(dim, 0.0), mag_dx(n), mag_dw(dim, 0.0);
      qkd::cpu::rmsnorm_backward({dx.data(), dw.data(), d.data(), x.data(), w.data(), rstd.data(), rows, dim});
      for (int r = 0; r < rows; ++r) {
        const double rs = rstd[r];
        double gn_abs = 0.0;
        for (int i = 0; i < dim; ++i) gn_abs += std::fabs(d[r * dim + i] * w[i] * x[r * dim + i] * rs);
        for (int i = 0; i < dim; ++i) {
          const size_t o = static_cast<size_t>(r) * dim + i;
          mag_dx[o] = rs * (std::fabs(d[o] * w[i]) + std::fabs(x[o] * rs) * gn_abs / dim);
          mag_dw[i] += std::fabs(d[o] * x[o] * rs);
        }
      }
      const std::string tag = fmt::format("rmsnorm fp32 rows {} dim {}", rows, dim);
      const std::vector<float> got_dx(got.begin(), got.begin() + n), got_dw(got.begin() + n, got.end());
      worst = std::max(worst, expect_close(tag + " dx", got_dx, dx, mag_dx));
      worst = std::max(worst, expect_close(tag + " dweight", got_dw, dw, mag_dw));
    }
  }
  MESSAGE("rmsnorm fp32 vs fp64: max err/mag " << worst);
}

TEST_CASE("rmsnorm_backward rejects bad shapes and aliasing") {
  std::vector<float> buf(16, 1.0f), rstd(2, 1.0f);
  CHECK_THROWS_WITH_AS(
      qkd::cpu::rmsnorm_backward({buf.data(), nullptr, buf.data() + 8, buf.data(), buf.data(), rstd.data(), 2, 0}),
      doctest::Contains("dim 0"), qkd::Error);
  CHECK_THROWS_WITH_AS(
      qkd::cpu::rmsnorm_backward({buf.data(), nullptr, buf.data(), buf.data() + 8, buf.data(), rstd.data(), 1, 4}),
      doctest::Contains("alias"), qkd::Error);
}

// ---- rope ----

std::vector<float> rope_inv_freq(int head_dim) {
  std::vector<float> inv_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * i / head_dim));
  return inv_freq;
}

TEST_CASE("rope_backward: finite differences in double, and backward undoes forward") {
  std::mt19937 rng(21);
  double worst = 0.0;
  for (int head_dim : {4, 8}) {
    const int n_tokens = 3, n_heads = 2;
    const std::vector<int32_t> pos = {0, 5, 3001};
    const auto inv_freq = rope_inv_freq(head_dim);
    const size_t n = static_cast<size_t>(n_tokens) * n_heads * head_dim;
    Vec x = randn(rng, n);
    const Vec dout = randn(rng, n);
    Vec dx = dout;
    qkd::cpu::rope_backward({dx.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
    auto loss = [&] {
      Vec xs = x;
      qkd::cpu::rope_forward({xs.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
      return project(dout, xs);
    };
    worst = std::max(worst, fd_check(fmt::format("rope head_dim {} dx", head_dim), x, dx, loss));

    Vec round_trip = x;
    qkd::cpu::rope_forward({round_trip.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
    qkd::cpu::rope_backward({round_trip.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
    for (size_t i = 0; i < n; ++i) REQUIRE(std::fabs(round_trip[i] - x[i]) <= 1e-14 * (1.0 + std::fabs(x[i])));
  }
  MESSAGE("rope finite differences: max relative error " << worst);
}

TEST_CASE("rope_backward: fp32 agrees with fp64 at long positions; bad head_dim throws") {
  std::mt19937 rng(22);
  const int n_tokens = 9, n_heads = 3, head_dim = 64;
  std::vector<int32_t> pos(n_tokens);
  std::uniform_int_distribution<int> pd(0, 40000);
  for (auto& p : pos) p = pd(rng);
  const auto inv_freq = rope_inv_freq(head_dim);
  const auto df = to_float(randn(rng, static_cast<size_t>(n_tokens) * n_heads * head_dim));
  std::vector<float> got = df;
  qkd::cpu::rope_backward({got.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
  Vec ref = to_double(df), mag(ref.size());
  qkd::cpu::rope_backward({ref.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
  for (size_t o = 0; o < mag.size(); o += 2) mag[o] = mag[o + 1] = std::fabs(df[o]) + std::fabs(df[o + 1]);
  MESSAGE("rope fp32 vs fp64: max err/mag " << expect_close("rope fp32 backward", got, ref, mag));

  CHECK_THROWS_WITH_AS(qkd::cpu::rope_backward({got.data(), pos.data(), inv_freq.data(), 1, 1, 5}),
                       doctest::Contains("rope_backward: head_dim 5"), qkd::Error);
}

// ---- swiglu ----

TEST_CASE("swiglu_backward: finite differences in double, strided, overwriting only the used columns") {
  std::mt19937 rng(31);
  double worst = 0.0;
  for (int rows : {1, 3}) {
    const int ffn_dim = 5;
    for (bool fused : {false, true}) {
      // fused: gate and up are the two halves of one [rows, 2 * ffn_dim + 1] projection output (one spare column)
      const int64_t ld_in = fused ? 2 * ffn_dim + 1 : ffn_dim;
      const size_t n_in = static_cast<size_t>(rows) * ld_in * (fused ? 1 : 2);
      Vec in = randn(rng, n_in, 3.0);
      in[0] = -40.0;  // silu' ~ 0: exp(-g) is huge
      in[1] = 40.0;   // silu' ~ 1
      double* gate = in.data();
      double* up = fused ? in.data() + ffn_dim : in.data() + rows * ld_in;
      const Vec dout = randn(rng, static_cast<size_t>(rows) * ffn_dim);
      constexpr double kSentinel = 12345.0;  // columns past ffn_dim must keep it
      Vec grad(n_in, kSentinel);
      double* dgate = grad.data();
      double* dup = fused ? grad.data() + ffn_dim : grad.data() + rows * ld_in;
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < ffn_dim; ++c) dgate[r * ld_in + c] = dup[r * ld_in + c] = kNaN;  // must be overwritten
      }
      qkd::cpu::swiglu_backward({dgate, dup, dout.data(), gate, up, rows, ffn_dim, ld_in});

      std::vector<size_t> gate_idx, up_idx;
      Vec dgate_used, dup_used;
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < ffn_dim; ++c) {
          gate_idx.push_back(static_cast<size_t>(gate - in.data() + r * ld_in + c));
          up_idx.push_back(static_cast<size_t>(up - in.data() + r * ld_in + c));
          dgate_used.push_back(dgate[r * ld_in + c]);
          dup_used.push_back(dup[r * ld_in + c]);
        }
      }
      for (size_t i = 0; i < n_in; ++i) {
        const bool used = std::find(gate_idx.begin(), gate_idx.end(), i) != gate_idx.end() ||
                          std::find(up_idx.begin(), up_idx.end(), i) != up_idx.end();
        if (!used) REQUIRE(grad[i] == kSentinel);
      }
      auto loss = [&] {
        Vec out(static_cast<size_t>(rows) * ffn_dim);
        qkd::cpu::swiglu_forward({out.data(), gate, up, rows, ffn_dim, ld_in});
        return project(dout, out);
      };
      const std::string tag = fmt::format("swiglu rows {} ld_in {}", rows, ld_in);
      worst = std::max(worst, fd_check(tag + " dgate", in, gate_idx, dgate_used, loss));
      worst = std::max(worst, fd_check(tag + " dup", in, up_idx, dup_used, loss));

      // In place (dgate over gate, dup over up) gives the same values.
      Vec in_place = in;
      double* g2 = in_place.data() + (gate - in.data());
      double* u2 = in_place.data() + (up - in.data());
      qkd::cpu::swiglu_backward({g2, u2, dout.data(), g2, u2, rows, ffn_dim, ld_in});
      for (size_t e = 0; e < gate_idx.size(); ++e) {
        REQUIRE(in_place[gate_idx[e]] == dgate_used[e]);
        REQUIRE(in_place[up_idx[e]] == dup_used[e]);
      }
    }
  }
  MESSAGE("swiglu finite differences: max relative error " << worst);
}

TEST_CASE("swiglu_backward: fp32 agrees with fp64; bad strides throw") {
  std::mt19937 rng(32);
  const int rows = 17, ffn_dim = 1000;
  const int64_t ld_in = 2 * ffn_dim;
  const auto in = to_float(randn(rng, static_cast<size_t>(rows) * ld_in, 4.0));
  const auto dout = to_float(randn(rng, static_cast<size_t>(rows) * ffn_dim));
  std::vector<float> grad(in.size());
  qkd::cpu::swiglu_backward({grad.data(), grad.data() + ffn_dim, dout.data(), in.data(), in.data() + ffn_dim, rows,
                             ffn_dim, ld_in});
  const Vec ind = to_double(in), doutd = to_double(dout);
  Vec ref(in.size()), mag(in.size());
  qkd::cpu::swiglu_backward({ref.data(), ref.data() + ffn_dim, doutd.data(), ind.data(), ind.data() + ffn_dim, rows,
                             ffn_dim, ld_in});
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < ffn_dim; ++c) {
      const size_t o = static_cast<size_t>(r) * ld_in + c;
      const double g = ind[o], u = ind[o + ffn_dim], d = doutd[static_cast<size_t>(r) * ffn_dim + c];
      const double sig = 1.0 / (1.0 + std::exp(-g));
      // exp's relative error is |g| ulps of its argument's rounding: a factor (1 + |g|) on every term
      mag[o] = std::fabs(d * u) * sig * (1.0 + std::fabs(g) * (1.0 - sig)) * (1.0 + std::fabs(g));
      mag[o + ffn_dim] = std::fabs(d * g * sig) * (1.0 + std::fabs(g));
    }
  }
  MESSAGE("swiglu fp32 vs fp64: max err/mag " << expect_close("swiglu fp32 backward", grad, ref, mag));

  CHECK_THROWS_WITH_AS(qkd::cpu::swiglu_backward({grad.data(), grad.data() + 1, dout.data(), in.data(), in.data(), 1,
                                                  8, 4}),
                       doctest::Contains("ld_in 4"), qkd::Error);
}

// ---- embedding ----

TEST_CASE("embedding_backward: finite differences in double, repeated and unused tokens") {
  std::mt19937 rng(41);
  const int vocab = 7, dim = 5;
  const std::vector<int32_t> tokens = {3, 0, 3, 6, 3, 1};  // 3 three times; 2, 4, 5 unused
  const int n_tokens = static_cast<int>(tokens.size());
  Vec table = randn(rng, static_cast<size_t>(vocab) * dim);
  const Vec dout = randn(rng, static_cast<size_t>(n_tokens) * dim);
  Vec dtable(table.size(), 0.0);
  qkd::cpu::embedding_backward({dtable.data(), dout.data(), tokens.data(), n_tokens, dim, vocab});
  auto loss = [&] {
    Vec out(dout.size());
    qkd::cpu::embedding_forward({out.data(), table.data(), tokens.data(), n_tokens, dim, vocab});
    return project(dout, out);
  };
  MESSAGE("embedding finite differences: max relative error " << fd_check("embedding dtable", table, dtable, loss));
}

TEST_CASE("embedding_backward: accumulates in token order whatever the thread count") {
  std::mt19937 rng(42);
  const int vocab = 50, dim = 130, n_tokens = 2000;  // large enough for the threaded path, 3 column strips
  std::vector<int32_t> tokens(n_tokens);
  std::uniform_int_distribution<int> td(0, vocab - 1);
  for (auto& t : tokens) t = td(rng);
  const auto dout = to_float(randn(rng, static_cast<size_t>(n_tokens) * dim));
  const auto prior = to_float(randn(rng, static_cast<size_t>(vocab) * dim));
  std::vector<float> want = prior;  // the definition: prior, then each token's row added in token order
  for (int t = 0; t < n_tokens; ++t) {
    for (int c = 0; c < dim; ++c) {
      want[static_cast<size_t>(tokens[t]) * dim + c] += dout[static_cast<size_t>(t) * dim + c];
    }
  }
  for (int threads : {1, 3}) {
    std::vector<float> dtable = prior;
    with_threads(threads, [&] {
      qkd::cpu::embedding_backward({dtable.data(), dout.data(), tokens.data(), n_tokens, dim, vocab});
      return 0;
    });
    CHECK(dtable == want);
  }
}

TEST_CASE("embedding_backward rejects ids outside the vocabulary before writing anything") {
  const int vocab = 7, dim = 3;
  std::vector<float> dtable(vocab * dim, 1.0f), dout(2 * dim, 2.0f);
  for (const std::vector<int32_t>& bad : {std::vector<int32_t>{2, 7}, std::vector<int32_t>{-1, 2}}) {
    const std::string want = fmt::format("embedding_backward: token {}", bad[0] == 2 ? 7 : -1);
    CHECK_THROWS_WITH_AS(qkd::cpu::embedding_backward({dtable.data(), dout.data(), bad.data(), 2, dim, vocab}),
                         doctest::Contains(want.c_str()), qkd::Error);
    CHECK(dtable == std::vector<float>(vocab * dim, 1.0f));
  }
}

// ---- attention ----

struct AttnShape {
  int batch, seq_len, n_heads, n_kv_heads, head_dim;
  size_t q_size() const { return static_cast<size_t>(batch) * seq_len * n_heads * head_dim; }
  size_t kv_size() const { return static_cast<size_t>(batch) * seq_len * n_kv_heads * head_dim; }
  size_t q_at(int b, int i, int h) const { return ((static_cast<size_t>(b) * seq_len + i) * n_heads + h) * head_dim; }
  size_t kv_at(int b, int j, int g) const {
    return ((static_cast<size_t>(b) * seq_len + j) * n_kv_heads + g) * head_dim;
  }
  std::string str() const {
    return fmt::format("attention b{} s{} h{}/{} hd{}", batch, seq_len, n_heads, n_kv_heads, head_dim);
  }
};

// Training's layout: k/v contiguous [batch, seq_len, n_kv_heads, head_dim], every sequence from position 0.
template <typename T>
void attention_forward(const AttnShape& s, const T* q, const T* k, const T* v, T* out, float* lse) {
  const std::vector<int32_t> start_pos(s.batch, 0);
  const int64_t seq_stride = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
  qkd::cpu::attention_forward(qkd::AttentionArgs<T>{out, q, k, v, lse, start_pos.data(), s.batch, s.seq_len,
                                                    s.n_heads, s.n_kv_heads, s.head_dim, s.seq_len * seq_stride,
                                                    s.head_dim, seq_stride, 1.0f / std::sqrt(float(s.head_dim))});
}

template <typename T>
void attention_backward(const AttnShape& s, const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const float* lse, T* dq, T* dk, T* dv) {
  qkd::cpu::attention_backward(qkd::AttentionBackwardArgs<T>{dq, dk, dv, dout, q, k, v, out, lse, s.batch, s.seq_len,
                                                             s.n_heads, s.n_kv_heads, s.head_dim,
                                                             1.0f / std::sqrt(float(s.head_dim))});
}

// The backward written out with the full probability matrix, in double, plus the magnitudes that bound an
// fp32 computation of it (file comment): P carries a relative error ~ (1 + scale sum|q k| + |lse|) ulps from
// exp(s - lse); delta and dP are dot products; dS = P (dP - delta) combines them; dq, dk, dv sum dS and P.
struct AttnReference {
  Vec dq, dk, dv, mag_dq, mag_dk, mag_dv;
};

AttnReference naive_attention_backward(const AttnShape& s, const Vec& q, const Vec& k, const Vec& v, const Vec& dout) {
  const int group = s.n_heads / s.n_kv_heads, hd = s.head_dim;
  const double scale = 1.0f / std::sqrt(float(s.head_dim));
  AttnReference r{Vec(s.q_size(), 0.0), Vec(s.kv_size(), 0.0), Vec(s.kv_size(), 0.0),
                  Vec(s.q_size(), 0.0), Vec(s.kv_size(), 0.0), Vec(s.kv_size(), 0.0)};
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.n_heads; ++h) {
      const int g = h / group;
      for (int i = 0; i < s.seq_len; ++i) {
        const double* qi = &q[s.q_at(b, i, h)];
        const double* di = &dout[s.q_at(b, i, h)];
        Vec sc(i + 1), sc_abs(i + 1), p(i + 1), mag_p(i + 1);
        double mx = -1e300, sc_abs_max = 0.0;
        for (int j = 0; j <= i; ++j) {
          const double* kj = &k[s.kv_at(b, j, g)];
          double dot = 0.0, dot_abs = 0.0;
          for (int d = 0; d < hd; ++d) {
            dot += qi[d] * kj[d];
            dot_abs += std::fabs(qi[d] * kj[d]);
          }
          sc[j] = scale * dot;
          sc_abs[j] = scale * dot_abs;
          mx = std::max(mx, sc[j]);
          sc_abs_max = std::max(sc_abs_max, sc_abs[j]);
        }
        double z = 0.0;
        for (int j = 0; j <= i; ++j) z += std::exp(sc[j] - mx);
        const double lse = mx + std::log(z);
        Vec out(hd, 0.0), mag_out(hd, 0.0);
        for (int j = 0; j <= i; ++j) {
          p[j] = std::exp(sc[j] - lse);
          mag_p[j] = p[j] * (1.0 + sc_abs[j] + sc_abs_max + std::fabs(lse));
          for (int d = 0; d < hd; ++d) {
            out[d] += p[j] * v[s.kv_at(b, j, g) + d];
            mag_out[d] += mag_p[j] * std::fabs(v[s.kv_at(b, j, g) + d]);
          }
        }
        double delta = 0.0, mag_delta = 0.0;
        for (int d = 0; d < hd; ++d) {
          delta += di[d] * out[d];
          mag_delta += std::fabs(di[d]) * (std::fabs(out[d]) + mag_out[d]);
        }
        for (int j = 0; j <= i; ++j) {
          const size_t kj = s.kv_at(b, j, g);
          double dp = 0.0, mag_dp = 0.0;
          for (int d = 0; d < hd; ++d) {
            dp += di[d] * v[kj + d];
            mag_dp += std::fabs(di[d] * v[kj + d]);
          }
          const double ds = p[j] * (dp - delta);
          const double mag_ds = mag_p[j] * std::fabs(dp - delta) + p[j] * (mag_dp + mag_delta);
          for (int d = 0; d < hd; ++d) {
            r.dq[s.q_at(b, i, h) + d] += scale * ds * k[kj + d];
            r.mag_dq[s.q_at(b, i, h) + d] += scale * mag_ds * std::fabs(k[kj + d]);
            r.dk[kj + d] += scale * ds * qi[d];
            r.mag_dk[kj + d] += scale * mag_ds * std::fabs(qi[d]);
            r.dv[kj + d] += p[j] * di[d];
            r.mag_dv[kj + d] += mag_p[j] * std::fabs(di[d]);
          }
        }
      }
    }
  }
  return r;
}

TEST_CASE("attention_backward: finite differences in double, causal GQA") {
  std::mt19937 rng(51);
  double worst = 0.0, worst_naive = 0.0;
  for (int seq_len : {1, 3, 5}) {
    for (const auto& [n_heads, n_kv_heads] : {std::pair{2, 2}, std::pair{4, 2}, std::pair{3, 1}}) {
      for (int head_dim : {4, 8}) {
        const AttnShape s{2, seq_len, n_heads, n_kv_heads, head_dim};
        Vec q = randn(rng, s.q_size(), 1.5), k = randn(rng, s.kv_size(), 1.5), v = randn(rng, s.kv_size());
        const Vec dout = randn(rng, s.q_size());
        Vec out(s.q_size());
        std::vector<float> lse(static_cast<size_t>(s.batch) * n_heads * seq_len);
        attention_forward(s, q.data(), k.data(), v.data(), out.data(), lse.data());
        Vec dq(s.q_size(), kNaN), dk(s.kv_size(), kNaN), dv(s.kv_size(), kNaN);  // all must be overwritten
        attention_backward(s, dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), dq.data(), dk.data(),
                           dv.data());
        auto loss = [&] {
          Vec o(s.q_size());
          attention_forward<double>(s, q.data(), k.data(), v.data(), o.data(), nullptr);
          return project(dout, o);
        };
        const std::string tag = s.str();
        worst = std::max(worst, fd_check(tag + " dq", q, dq, loss));
        worst = std::max(worst, fd_check(tag + " dk", k, dk, loss));
        worst = std::max(worst, fd_check(tag + " dv", v, dv, loss));

        // The naive full-matrix backward agrees to fp64 rounding.
        const auto ref = naive_attention_backward(s, q, k, v, dout);
        for (const auto& [got, want] : {std::pair{&dq, &ref.dq}, std::pair{&dk, &ref.dk}, std::pair{&dv, &ref.dv}}) {
          for (size_t i = 0; i < got->size(); ++i) {
            worst_naive = std::max(worst_naive, std::fabs((*got)[i] - (*want)[i]));
            REQUIRE(std::fabs((*got)[i] - (*want)[i]) <= 1e-12);
          }
        }
      }
    }
  }
  MESSAGE("attention finite differences: max relative error " << worst << "; vs the naive fp64 backward: max abs "
                                                               << worst_naive);
}

TEST_CASE("attention_backward: fp32 agrees with a naive fp64 backward; same bits for any thread count") {
  std::mt19937 rng(52);
  double worst = 0.0;
  const AttnShape shapes[] = {{2, 1, 4, 2, 8}, {2, 5, 6, 2, 4}, {2, 37, 4, 2, 64}, {1, 20, 3, 3, 36}};
  for (const AttnShape& s : shapes) {
    const auto qf = to_float(randn(rng, s.q_size())), kf = to_float(randn(rng, s.kv_size()));
    const auto vf = to_float(randn(rng, s.kv_size())), df = to_float(randn(rng, s.q_size()));
    std::vector<float> out(s.q_size()), lse(static_cast<size_t>(s.batch) * s.n_heads * s.seq_len);
    attention_forward(s, qf.data(), kf.data(), vf.data(), out.data(), lse.data());
    auto run = [&] {
      std::vector<float> grads(s.q_size() + 2 * s.kv_size(), std::numeric_limits<float>::quiet_NaN());
      float* dq = grads.data();
      float* dk = dq + s.q_size();
      float* dv = dk + s.kv_size();
      attention_backward(s, df.data(), qf.data(), kf.data(), vf.data(), out.data(), lse.data(), dq, dk, dv);
      return grads;
    };
    const auto got = with_threads(3, run);
    CHECK(with_threads(1, run) == got);
    const auto ref = naive_attention_backward(s, to_double(qf), to_double(kf), to_double(vf), to_double(df));
    const auto part = [&](size_t off, size_t n) {
      return std::vector<float>(got.begin() + off, got.begin() + off + n);
    };
    const std::string tag = s.str() + " fp32";
    worst = std::max(worst, expect_close(tag + " dq", part(0, s.q_size()), ref.dq, ref.mag_dq));
    worst = std::max(worst, expect_close(tag + " dk", part(s.q_size(), s.kv_size()), ref.dk, ref.mag_dk));
    worst = std::max(worst, expect_close(tag + " dv", part(s.q_size() + s.kv_size(), s.kv_size()), ref.dv, ref.mag_dv));
  }
  MESSAGE("attention fp32 vs fp64: max err/mag " << worst);
}

TEST_CASE("attention_backward rejects bad head counts, a missing lse and aliasing") {
  std::vector<float> buf(4096, 0.0f), lse(64, 0.0f);
  float* p = buf.data();
  auto args = [&](int n_heads, int n_kv_heads) {
    return qkd::AttentionBackwardArgs<float>{p,        p + 512,  p + 1024, p + 1536, p + 2048, p + 2560,
                                             p + 3072, p + 3584, lse.data(), 1, 2, n_heads, n_kv_heads, 8, 0.3f};
  };
  CHECK_NOTHROW(qkd::cpu::attention_backward(args(4, 2)));
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_backward(args(3, 2)),
                       doctest::Contains("attention_backward: n_heads 3 is not a positive multiple of n_kv_heads 2"),
                       qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_backward(args(4, 0)), doctest::Contains("n_kv_heads 0"), qkd::Error);
  auto no_lse = args(4, 2);
  no_lse.lse = nullptr;
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_backward(no_lse), doctest::Contains("lse"), qkd::Error);
  auto aliased = args(4, 2);
  aliased.dq = const_cast<float*>(aliased.q);
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_backward(aliased), doctest::Contains("aliases"), qkd::Error);
}

// ---- matmul ----

// dx = dy . w and dw = dy^T . x against double loops, with the prior contents of dx/dw in Add mode.
void check_matmul_backward(int m, int n, int k, qkd::Accumulate mode, std::mt19937& rng, double& worst) {
  const auto dy = to_float(randn(rng, static_cast<size_t>(m) * n));
  const auto w = to_float(randn(rng, static_cast<size_t>(n) * k));
  const auto x = to_float(randn(rng, static_cast<size_t>(m) * k));
  const auto dx0 = to_float(randn(rng, static_cast<size_t>(m) * k));
  const auto dw0 = to_float(randn(rng, static_cast<size_t>(n) * k));
  std::vector<float> dx = dx0, dw = dw0;
  qkd::cpu::matmul_backward_data({dx.data(), dy.data(), w.data(), m, n, k, mode});
  qkd::cpu::matmul_backward_weight({dw.data(), dy.data(), x.data(), m, n, k, mode});
  const bool add = mode == qkd::Accumulate::Add;
  Vec ref_dx(dx.size()), mag_dx(dx.size()), ref_dw(dw.size()), mag_dw(dw.size());
  for (int i = 0; i < m; ++i) {
    for (int c = 0; c < k; ++c) {
      const size_t o = static_cast<size_t>(i) * k + c;
      double s = add ? dx0[o] : 0.0, a = add ? std::fabs(dx0[o]) : 0.0;
      for (int j = 0; j < n; ++j) {
        const double t = static_cast<double>(dy[static_cast<size_t>(i) * n + j]) * w[static_cast<size_t>(j) * k + c];
        s += t;
        a += std::fabs(t);
      }
      ref_dx[o] = s;
      mag_dx[o] = a;
    }
  }
  for (int j = 0; j < n; ++j) {
    for (int c = 0; c < k; ++c) {
      const size_t o = static_cast<size_t>(j) * k + c;
      double s = add ? dw0[o] : 0.0, a = add ? std::fabs(dw0[o]) : 0.0;
      for (int i = 0; i < m; ++i) {
        const double t = static_cast<double>(dy[static_cast<size_t>(i) * n + j]) * x[static_cast<size_t>(i) * k + c];
        s += t;
        a += std::fabs(t);
      }
      ref_dw[o] = s;
      mag_dw[o] = a;
    }
  }
  const std::string tag = fmt::format("matmul backward m {} n {} k {} {}", m, n, k, add ? "add" : "overwrite");
  worst = std::max(worst, expect_close(tag + " dx", dx, ref_dx, mag_dx));
  worst = std::max(worst, expect_close(tag + " dw", dw, ref_dw, mag_dw));
}

TEST_CASE("matmul_backward_data and matmul_backward_weight match double-precision loops") {
  std::mt19937 rng(61);
  double worst = 0.0;
  // 600 > the 512 reduction chunk of dx (two chunks), 1100 > it for dw (three chunks, the last short).
  const int shapes[][3] = {{1, 1, 1},  {3, 17, 5},  {17, 3, 65},  {65, 17, 3},   {1, 384, 1024},
                           {2, 1, 3},  {65, 65, 65}, {33, 600, 17}, {1100, 17, 9}, {50, 1030, 70}};
  for (const auto& s : shapes) {
    for (auto mode : {qkd::Accumulate::Overwrite, qkd::Accumulate::Add}) {
      check_matmul_backward(s[0], s[1], s[2], mode, rng, worst);
    }
  }
  MESSAGE("matmul backward: max err/mag " << worst);
}

TEST_CASE("matmul backward: empty reductions, thread-count independence, bad arguments") {
  std::mt19937 rng(62);
  // An empty reduction is a zero sum: Overwrite writes zeros, Add leaves the contents.
  std::vector<float> buf(12, 3.0f), none(1, 0.0f);
  qkd::cpu::matmul_backward_weight({buf.data(), none.data(), none.data(), 0, 3, 4, qkd::Accumulate::Add});
  CHECK(buf == std::vector<float>(12, 3.0f));
  qkd::cpu::matmul_backward_weight({buf.data(), none.data(), none.data(), 0, 3, 4, qkd::Accumulate::Overwrite});
  CHECK(buf == std::vector<float>(12, 0.0f));
  buf.assign(12, 3.0f);
  qkd::cpu::matmul_backward_data({buf.data(), none.data(), none.data(), 3, 0, 4, qkd::Accumulate::Overwrite});
  CHECK(buf == std::vector<float>(12, 0.0f));

  const int m = 700, n = 600, k = 100;
  const auto dy = to_float(randn(rng, static_cast<size_t>(m) * n));
  const auto w = to_float(randn(rng, static_cast<size_t>(n) * k));
  const auto x = to_float(randn(rng, static_cast<size_t>(m) * k));
  auto run = [&] {
    std::vector<float> dx(static_cast<size_t>(m) * k), dw(static_cast<size_t>(n) * k, 1.0f);
    qkd::cpu::matmul_backward_data({dx.data(), dy.data(), w.data(), m, n, k});
    qkd::cpu::matmul_backward_weight({dw.data(), dy.data(), x.data(), m, n, k});
    dx.insert(dx.end(), dw.begin(), dw.end());
    return dx;
  };
  CHECK(with_threads(1, run) == with_threads(3, run));

  float a[4], b[4];
  CHECK_THROWS_WITH_AS(qkd::cpu::matmul_backward_data({a, b, b, -1, 2, 2}),
                       doctest::Contains("matmul_backward_data: negative shape m -1"), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::matmul_backward_weight({a, b, b, 1, -2, 2}),
                       doctest::Contains("matmul_backward_weight: negative shape m 1 n -2"), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::matmul_backward_data({a, a, b, 1, 1, 1}), doctest::Contains("alias"), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::matmul_backward_weight({a, b, a, 1, 1, 1}), doctest::Contains("alias"), qkd::Error);
}

}  // namespace
