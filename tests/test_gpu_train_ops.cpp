// The training-only CUDA ops (kernels/{softmax_loss,l2norm,fake_quant,adamw}.cu) against their CPU twins
// (kernels/cpu/*.cpp), on fresh random inputs (bf16-representable where the kernel reads bf16; the twin gets the
// same values) at awkward sizes: 1, 3 and 37 rows, vocabularies 1000, 32000 and 50257 (odd: a scalar tail),
// ld > vocab (padding that must stay untouched) and ld odd (the scalar-load path), per-channel groups whose
// vector count is not a power of two. Overwritten outputs are poisoned with NaN first; accumulated ones start
// from random values. Every op also runs twice on the same inputs and must give the same bits.
//
// Bounds, from precision (each derivation is next to its check):
//   - a value stored as bf16 is the kernel's fp32 result rounded once: relative error <= 2^-9, checked with 2^-8;
//   - an fp32 result that the kernel and the twin compute differently (a sum in another order, __expf against
//     exp) differs by at most a few u = 2^-24 per operation times the magnitudes that flow into it; where that
//     needs an estimate, kFp32Rel = 1e-5 of the magnitudes (METHOD.md's fp32 bound) is used;
//   - fake quantization's codes and AdamW's update are computed with the same correctly rounded operations on
//     both sides, so they are compared bit for bit.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/adamw.h"
#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/fake_quant.h"
#include "kernels/l2norm.h"
#include "kernels/softmax_loss.h"
#include "tests/gpu_test_util.h"

using namespace qkd;

namespace {

constexpr double kBf16Eps = 1.0 / 256.0;     // 2^-8: twice bf16's unit roundoff
constexpr double kFp32U = 1.0 / 16777216.0;  // 2^-24: fp32's unit roundoff
constexpr double kFp32Rel = 1e-5;

using qkd::test::DeviceArray;

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

std::vector<float> random_floats(size_t count, float scale = 1.0f, float offset = 0.0f) {
  std::normal_distribution<float> d(offset, scale);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng());
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& f) {
  std::vector<uint16_t> b(f.size());
  for (size_t i = 0; i < f.size(); ++i) b[i] = float_to_bf16(f[i]);
  return b;
}

std::vector<float> to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bf16_to_float(bits[i]);
  return f;
}

// |got - ref| <= bound[i] for every element (NaN fails); reports max abs/rel error, max error / bound and the
// first mismatches.
void expect_within(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
                   const std::vector<double>& bound) {
  REQUIRE(got.size() == ref.size());
  REQUIRE(bound.size() == ref.size());
  double max_abs = 0.0, max_rel = 0.0, max_frac = 0.0;
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    max_abs = std::max(max_abs, std::isnan(err) ? INFINITY : err);
    if (ref[i] != 0.0) max_rel = std::max(max_rel, err / std::fabs(ref[i]));
    if (bound[i] > 0.0) max_frac = std::max(max_frac, err / bound[i]);
    if (!(err <= bound[i])) {
      if (bad < 5) first += fmt::format("  [{}] got {} want {} (bound {:.3g})\n", i, got[i], ref[i], bound[i]);
      ++bad;
    }
  }
  MESSAGE(what << ": max abs " << max_abs << ", max rel " << max_rel << ", max err/bound " << max_frac);
  INFO(what << ": " << bad << " of " << got.size() << " outside the bound\n" << first);
  CHECK(bad == 0);
}

template <typename T>
void expect_same_bits(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  INFO(what);
  REQUIRE(a.size() == b.size());
  size_t first = a.size();
  for (size_t i = 0; i < a.size() && first == a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) first = i;
  }
  INFO("first difference at " << first);
  CHECK(first == a.size());
}

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

}  // namespace

// ============================================================================================== softmax_loss

namespace {

struct LossCase {
  int rows, vocab;
  int64_t ld;
  bool ce, kl;
  float tau;
};

constexpr uint16_t kPadBits = 0x4242;  // bf16 48.5 in the padding columns: must survive untouched

struct LossInputs {
  std::vector<uint16_t> z, t;    // [rows, ld] bf16 bits
  std::vector<int32_t> targets;  // [rows]
};

LossInputs make_loss_inputs(const LossCase& c) {
  LossInputs in;
  const size_t total = static_cast<size_t>(c.rows) * c.ld;
  in.z.assign(total, kPadBits);
  in.t.assign(total, kPadBits);
  std::normal_distribution<float> logit(0.0f, 4.0f), noise(0.0f, 1.0f), offset(0.0f, 10.0f);
  std::uniform_int_distribution<int> pick(0, c.vocab - 1);
  for (int r = 0; r < c.rows; ++r) {
    const float off = offset(rng());  // rows far from 0: the maximum must be subtracted
    for (int i = 0; i < c.vocab; ++i) {
      const float z = logit(rng()) + off;
      in.z[static_cast<size_t>(r) * c.ld + i] = float_to_bf16(z);
      in.t[static_cast<size_t>(r) * c.ld + i] = float_to_bf16(z + noise(rng()));  // a teacher close to the student
    }
    in.targets.push_back(r % 5 == 1 ? -1 : pick(rng()));  // every fifth row (from the second) ignored
  }
  return in;
}

struct LossRun {
  std::vector<uint16_t> dz;
  std::vector<float> ce, kl;
};

LossRun run_gpu_loss(const LossCase& c, const LossInputs& in, float ce_w, float kl_w, float gscale, LossGrad grad) {
  DeviceArray<uint16_t> d_z(in.z), d_t(in.t);
  DeviceArray<int32_t> d_y(in.targets);
  DeviceArray<float> d_ce(c.rows), d_kl(c.rows);
  d_ce.poison();
  d_kl.poison();
  SoftmaxLossArgs<__nv_bfloat16> a{d_z.bf16(), c.kl ? d_t.bf16() : nullptr, c.ce ? d_y.ptr : nullptr, d_ce.ptr,
                                   d_kl.ptr, c.rows, c.vocab, c.ld};
  a.temperature = c.tau;
  a.ce_weight = ce_w;
  a.kl_weight = kl_w;
  a.grad_scale = gscale;
  a.grad = grad;
  cuda::softmax_loss(a, nullptr);
  return {d_z.download(), d_ce.download(), d_kl.download()};
}

}  // namespace

TEST_CASE("softmax_loss matches the fp64 twin: ce, KL, dz, padding, ignored targets, determinism") {
  const LossCase cases[] = {
      {3, 1000, 1000, true, true, 2.0f},       // vector path, both losses, tau != 1
      {1, 32000, 32000, true, false, 1.0f},    // one row, ce only
      {37, 50257, 50264, true, true, 1.0f},    // odd vocab (scalar tail), ld > vocab with ld % 8 == 0
      {3, 50257, 50257, true, true, 1.5f},     // odd ld: the scalar-load path
      {37, 1000, 1003, false, true, 0.8f},     // kl only, odd ld > vocab
      {3, 32000, 32008, true, true, 1.0f},     // padding on the vector path
  };
  for (const LossCase& c : cases) {
    const std::string tag = fmt::format("rows {} vocab {} ld {} ce {} kl {} tau {}", c.rows, c.vocab, c.ld, c.ce,
                                        c.kl, c.tau);
    INFO(tag);
    const LossInputs in = make_loss_inputs(c);
    const float ce_w = 1.0f, kl_w = 0.5f, gscale = 1.0f / static_cast<float>(c.rows);
    const LossRun gpu = run_gpu_loss(c, in, ce_w, kl_w, gscale, LossGrad::Write);

    // The twin in double on the same (bf16) values.
    const size_t total = static_cast<size_t>(c.rows) * c.ld;
    std::vector<double> z(total), t(total), ce(c.rows), kl(c.rows);
    for (size_t i = 0; i < total; ++i) {
      z[i] = bf16_to_float(in.z[i]);
      t[i] = bf16_to_float(in.t[i]);
    }
    const std::vector<double> z_in = z;
    SoftmaxLossArgs<double> ra{z.data(), c.kl ? t.data() : nullptr, c.ce ? in.targets.data() : nullptr, ce.data(),
                               kl.data(), c.rows, c.vocab, c.ld};
    ra.temperature = c.tau;
    ra.ce_weight = ce_w;
    ra.kl_weight = kl_w;
    ra.grad_scale = gscale;
    cpu::softmax_loss(ra);

    // Bounds. dz = gscale (ce_w (p - onehot) + kl_w tau (ps - pt)): each probability carries a relative fp32
    // error (sums of exponentials in another order, __expf, the scaled logits' rounding), so the kernel's fp32
    // dz is within kFp32Rel of mag = gscale (ce_w (p + onehot) + kl_w tau (ps + pt)), then rounded to bf16.
    // ce = lse - z[y]: within kFp32Rel of |lse| + |z[y]|. KL = tau^2 sum pt (log pt - log ps), each log formed
    // as (x - m) / tau - log S: within kFp32Rel of tau^2 sum pt (|x_t - m_t| / tau + |log S_t| + same for s).
    std::vector<double> dz_bound(total, 0.0), ce_bound(c.rows), kl_bound(c.rows);
    for (int r = 0; r < c.rows; ++r) {
      const double* zr = z_in.data() + static_cast<size_t>(r) * c.ld;
      const double* tr = t.data() + static_cast<size_t>(r) * c.ld;
      double mz = -INFINITY, mt = -INFINITY;
      for (int i = 0; i < c.vocab; ++i) {
        mz = std::max(mz, zr[i]);
        mt = std::max(mt, tr[i]);
      }
      double sz = 0.0, ss = 0.0, st = 0.0;
      for (int i = 0; i < c.vocab; ++i) {
        sz += std::exp(zr[i] - mz);
        ss += std::exp((zr[i] - mz) / c.tau);
        st += std::exp((tr[i] - mt) / c.tau);
      }
      const int y = c.ce ? in.targets[r] : -1;
      double kl_mag = 0.0;
      for (int i = 0; i < c.vocab; ++i) {
        const double p = std::exp(zr[i] - mz) / sz, ps = std::exp((zr[i] - mz) / c.tau) / ss,
                     pt = std::exp((tr[i] - mt) / c.tau) / st;
        double mag = 0.0;
        if (y >= 0) mag += ce_w * (p + (i == y ? 1.0 : 0.0));
        if (c.kl) {
          mag += kl_w * c.tau * (ps + pt);
          kl_mag += pt * ((mt - tr[i]) / c.tau + std::fabs(std::log(st)) + (mz - zr[i]) / c.tau +
                          std::fabs(std::log(ss)));
        }
        const size_t e = static_cast<size_t>(r) * c.ld + i;
        dz_bound[e] = kBf16Eps * std::fabs(z[e]) + kFp32Rel * gscale * mag;
      }
      ce_bound[r] = y >= 0 ? kFp32Rel * (1.0 + std::fabs(ce[r] + zr[y]) + std::fabs(zr[y])) : 0.0;
      kl_bound[r] = c.kl ? kFp32Rel * c.tau * c.tau * (1.0 + kl_mag) : 0.0;
    }
    // Padding columns: the reference keeps the pad values, and the kernel must have left them bit for bit.
    std::vector<float> dz_gpu = to_float(gpu.dz);
    for (int r = 0; r < c.rows; ++r) {
      for (int64_t i = c.vocab; i < c.ld; ++i) CHECK(gpu.dz[static_cast<size_t>(r) * c.ld + i] == kPadBits);
    }
    expect_within(tag + " dz", dz_gpu, z, dz_bound);
    expect_within(tag + " ce", gpu.ce, ce, ce_bound);
    expect_within(tag + " kl", gpu.kl, kl, kl_bound);

    const LossRun again = run_gpu_loss(c, in, ce_w, kl_w, gscale, LossGrad::Write);
    expect_same_bits(tag + " dz, second run", gpu.dz, again.dz);
    expect_same_bits(tag + " ce, second run", gpu.ce, again.ce);
    expect_same_bits(tag + " kl, second run", gpu.kl, again.kl);
    // LossGrad::None: the logits stay, and the losses are the same bits as with the gradient.
    const LossRun none = run_gpu_loss(c, in, ce_w, kl_w, gscale, LossGrad::None);
    expect_same_bits(tag + " logits untouched without a gradient", none.dz, in.z);
    expect_same_bits(tag + " ce without a gradient", gpu.ce, none.ce);
    expect_same_bits(tag + " kl without a gradient", gpu.kl, none.kl);
  }
}

TEST_CASE("softmax_loss: KL and its gradient are exactly zero when the teacher is the student") {
  for (float tau : {1.0f, 2.0f}) {
    const LossCase c{3, 32000, 32000, false, true, tau};
    LossInputs in = make_loss_inputs(c);
    in.t = in.z;
    const LossRun gpu = run_gpu_loss(c, in, 0.0f, 1.0f, 1.0f, LossGrad::Write);
    INFO("tau " << tau);
    for (float v : gpu.kl) CHECK(v == 0.0f);
    CHECK(std::all_of(gpu.dz.begin(), gpu.dz.end(), [](uint16_t b) { return (b & 0x7fffu) == 0; }));
  }
}

TEST_CASE("softmax_loss: a target beyond the vocabulary gives NaN for its row only; bad arguments throw") {
  const LossCase c{3, 1000, 1000, true, false, 1.0f};
  LossInputs in = make_loss_inputs(c);
  in.targets = {5, 1000, 7};
  const LossRun gpu = run_gpu_loss(c, in, 1.0f, 0.0f, 1.0f, LossGrad::Write);
  CHECK(std::isfinite(gpu.ce[0]));
  CHECK(std::isnan(gpu.ce[1]));
  CHECK(std::isfinite(gpu.ce[2]));
  const std::vector<float> dz = to_float(gpu.dz);
  CHECK(std::all_of(dz.begin() + 1000, dz.begin() + 2000, [](float v) { return std::isnan(v); }));
  CHECK(std::all_of(dz.begin() + 2000, dz.end(), [](float v) { return std::isfinite(v); }));

  DeviceArray<uint16_t> d_z(in.z);
  SoftmaxLossArgs<__nv_bfloat16> a{d_z.bf16(), nullptr, nullptr, nullptr, nullptr, 3, 1000, 999};
  throws_with([&] { cuda::softmax_loss(a, nullptr); }, "ld 999");
  a.ld = 1000;
  a.temperature = -1.0f;
  throws_with([&] { cuda::softmax_loss(a, nullptr); }, "temperature -1");
}

// ==================================================================================================== l2norm

TEST_CASE("l2norm forward and backward match the twin, with a clamped row; deterministic") {
  for (int rows : {1, 3, 37}) {
    for (int dim : {8, 4096, 6152}) {  // 6152 / 8 = 769 vectors: a partly filled last warp
      const std::string tag = fmt::format("l2norm rows {} dim {}", rows, dim);
      INFO(tag);
      const size_t n = static_cast<size_t>(rows) * dim;
      const float eps = 1e-6f;
      std::vector<float> xf = random_floats(n, 2.0f);
      if (rows > 1) std::fill(xf.begin() + dim, xf.begin() + 2 * dim, 0.0f);  // row 1: zero, clamped to eps
      const std::vector<uint16_t> x = to_bf16(xf), dout = to_bf16(random_floats(n)), prior = to_bf16(random_floats(n));
      const std::vector<float> x_v = to_float(x), dout_v = to_float(dout), prior_v = to_float(prior);

      DeviceArray<uint16_t> d_x(x), d_out(n), d_dout(dout), d_dx(prior);
      DeviceArray<float> d_norm(rows);
      d_out.poison();
      d_norm.poison();
      cuda::l2norm_forward({d_out.bf16(), d_norm.ptr, d_x.bf16(), rows, dim, eps}, nullptr);
      const std::vector<uint16_t> out_bits = d_out.download();
      const std::vector<float> out = to_float(out_bits), norm = d_norm.download();

      std::vector<float> out_ref(n), norm_ref(rows);
      cpu::l2norm_forward(L2NormArgs<float>{out_ref.data(), norm_ref.data(), x_v.data(), rows, dim, eps});
      // norm: the kernel sums 8 squares per thread (one sweep at these widths) and then a tree of <= 10 levels,
      // all terms positive: relative error <= ~20 u of the sum, 10 u of the norm (the twin sums in double);
      // kFp32Rel covers it. out: x times the kernel's 1 / norm, a few u more, then one bf16 rounding.
      std::vector<double> out_r(out_ref.begin(), out_ref.end()), norm_r(norm_ref.begin(), norm_ref.end());
      std::vector<double> out_b(n), norm_b(rows);
      for (size_t i = 0; i < n; ++i) out_b[i] = (kBf16Eps + kFp32Rel) * std::fabs(out_r[i]);
      for (int r = 0; r < rows; ++r) norm_b[r] = kFp32Rel * norm_r[r];
      expect_within(tag + " out", out, out_r, out_b);
      expect_within(tag + " norm", norm, norm_r, norm_b);
      if (rows > 1) CHECK(norm[1] == eps);

      cuda::l2norm_backward({d_dx.bf16(), d_dout.bf16(), d_out.bf16(), d_norm.ptr, d_x.bf16(), rows, dim, eps},
                            nullptr);
      const std::vector<uint16_t> dx_bits = d_dx.download();
      // The twin on the kernel's own out and norm (the backward's inputs), from the same prior.
      std::vector<float> dx_ref = prior_v;
      cpu::l2norm_backward(
          L2NormBackwardArgs<float>{dx_ref.data(), dout_v.data(), out.data(), norm.data(), x_v.data(), rows, dim, eps});
      // dx = prior + (dout - out dot) / norm: fp32 error of the dot (another order) within kFp32Rel of
      // sum |dout out|, then one bf16 rounding of the sum with the prior.
      std::vector<double> dx_r(dx_ref.begin(), dx_ref.end()), dx_b(n);
      for (int r = 0; r < rows; ++r) {
        double dot_mag = 0.0;
        for (int i = 0; i < dim; ++i) dot_mag += std::fabs(dout_v[r * dim + i] * out[r * dim + i]);
        for (int i = 0; i < dim; ++i) {
          const size_t e = static_cast<size_t>(r) * dim + i;
          const double term = (std::fabs(dout_v[e]) + std::fabs(out[e]) * dot_mag) / norm[r];
          dx_b[e] = kBf16Eps * std::fabs(dx_r[e]) + kFp32Rel * (std::fabs(prior_v[e]) + term);
        }
      }
      expect_within(tag + " dx", to_float(dx_bits), dx_r, dx_b);

      // determinism
      d_out.poison();
      d_dx.upload(prior);
      cuda::l2norm_forward({d_out.bf16(), d_norm.ptr, d_x.bf16(), rows, dim, eps}, nullptr);
      cuda::l2norm_backward({d_dx.bf16(), d_dout.bf16(), d_out.bf16(), d_norm.ptr, d_x.bf16(), rows, dim, eps},
                            nullptr);
      expect_same_bits(tag + " out, second run", out_bits, d_out.download());
      expect_same_bits(tag + " dx, second run", dx_bits, d_dx.download());
    }
  }
  DeviceArray<uint16_t> d(64);
  DeviceArray<float> dn(4);
  throws_with([&] { cuda::l2norm_forward({d.bf16(), dn.ptr, d.bf16(), 4, 12}, nullptr); }, "dim 12");
}

// ================================================================================================ fake_quant

namespace {

struct FqShape {
  int n, k, gs;
};

// Scales from the 4-bit-style rule for `bits`, jittered (and some negated, as the rule itself can give) so that
// some weights clip.
std::vector<float> random_scales(const std::vector<float>& w, const FqShape& s, int bits) {
  std::vector<float> scale(static_cast<size_t>(s.n) * (s.k / s.gs));
  cpu::fake_quant_init_scales(w.data(), s.n, s.k, s.gs, bits, scale.data());
  std::uniform_real_distribution<float> jitter(0.6f, 1.2f);
  std::bernoulli_distribution flip(0.2);
  for (float& v : scale) v *= flip(rng()) ? -jitter(rng()) : jitter(rng());
  return scale;
}

}  // namespace

TEST_CASE("fake_quant forward and backward match the twin: codes bit for bit, LSQ sums within fp32") {
  const FqShape shapes[] = {{1, 256, 32}, {3, 256, 64}, {37, 4096, 128}, {3, 4096, 4096}, {37, 96, 96},
                            {3, 256, 256}, {1, 224, 224}};
  for (const FqShape& s : shapes) {
    for (int bits : {2, 3, 4, 8}) {
      for (bool with_clip : {false, true}) {
        const std::string tag = fmt::format("fake_quant n {} k {} gs {} bits {} clip {}", s.n, s.k, s.gs, bits,
                                            with_clip);
        INFO(tag);
        const size_t nk = static_cast<size_t>(s.n) * s.k;
        const int groups = s.k / s.gs;
        const std::vector<float> w = random_floats(nk, 0.02f), dwq = random_floats(nk, 1e-3f);
        const std::vector<float> scale = random_scales(w, s, bits);
        const float gamma = 0.91f;
        const float* clip = with_clip ? &gamma : nullptr;

        // forward: the kernel's wq is bf16(s_e q) of the twin's exact s_e q, bit for bit.
        DeviceArray<float> d_w(w), d_scale(scale), d_clip(std::vector<float>{gamma});
        DeviceArray<uint16_t> d_wq(nk);
        d_wq.poison();
        cuda::fake_quant_forward({d_wq.bf16(), d_w.ptr, d_scale.ptr, with_clip ? d_clip.ptr : nullptr, s.n, s.k, s.gs,
                                  bits},
                                 nullptr);
        const std::vector<uint16_t> wq = d_wq.download();
        std::vector<float> wq_ref(nk);
        cpu::fake_quant_forward(FakeQuantArgs<float>{wq_ref.data(), w.data(), scale.data(), clip, s.n, s.k, s.gs, bits});
        expect_same_bits(tag + " wq", wq, to_bf16(wq_ref));
        // For |q| <= 2^5 distinct codes stay distinct after the bf16 rounding (its error is below s_e / 2), so
        // equal wq means equal q; at 8 bits the backward's exact dw mask below checks the codes' ranges too.

        // backward, dw separate from dwq, dclip accumulating onto 0.5
        const float dclip_prior = 0.5f;
        DeviceArray<float> d_dwq(dwq), d_dw(nk), d_dscale(scale.size()), d_dclip(std::vector<float>{dclip_prior}),
            d_scratch(s.n);
        d_dw.poison();
        d_dscale.poison();
        d_scratch.poison();
        FakeQuantBackwardArgs b{d_dw.ptr, d_dscale.ptr, with_clip ? d_dclip.ptr : nullptr, d_dwq.ptr, d_w.ptr,
                                d_scale.ptr, with_clip ? d_clip.ptr : nullptr, s.n, s.k, s.gs, bits, d_scratch.ptr};
        cuda::fake_quant_backward(b, nullptr);
        const std::vector<float> dw = d_dw.download(), dscale = d_dscale.download(), dclip = d_dclip.download();

        std::vector<float> dw_ref(nk), dscale_ref(scale.size());
        float dclip_ref = dclip_prior;
        cpu::fake_quant_backward(FakeQuantBackwardArgs{dw_ref.data(), dscale_ref.data(), with_clip ? &dclip_ref : nullptr,
                                                       dwq.data(), w.data(), scale.data(), clip, s.n, s.k, s.gs, bits});
        expect_same_bits(tag + " dw (the STE mask)", dw, dw_ref);

        // dscale: the same terms dwq (q - v) or dwq q (v in fp32 on both sides), summed in fp32 over gs values
        // by the kernel (in double by the twin): |err| <= (gs + 8) u gamma lsq sum |term| (recursive summation's
        // worst case plus the term's own roundings), and 4 u of the result for the fp32 lsq_scale (a sqrt and a
        // division), its product and the product with gamma.
        const int qmax = (1 << (bits - 1)) - 1;
        const double lsq = 1.0 / std::sqrt(static_cast<double>(s.gs) * qmax);
        const double gm = with_clip ? gamma : 1.0;
        std::vector<double> ds_r(dscale_ref.begin(), dscale_ref.end()), ds_b(scale.size());
        double clip_mag = 0.0, clip_b = 0.0;
        for (int r = 0; r < s.n; ++r) {
          for (int g = 0; g < groups; ++g) {
            const size_t si = static_cast<size_t>(r) * groups + g;
            const float s_e = bf16_to_float(float_to_bf16(static_cast<float>(gm) * scale[si]));
            double mag = 0.0;
            for (int c = g * s.gs; c < (g + 1) * s.gs; ++c) {
              const size_t i = static_cast<size_t>(r) * s.k + c;
              const float v = s_e != 0.0f ? w[i] / s_e : 0.0f;
              mag += std::fabs(dwq[i]) * (std::fabs(v) + qmax + 1);  // |q - v| and |q| are both below this
            }
            ds_b[si] = (s.gs + 8) * kFp32U * gm * lsq * mag + 4 * kFp32U * std::fabs(ds_r[si]);
            // dclip's terms are s * dL/ds_e = s * dscale / (gamma lsq): the clip factor has no LSQ scale
            clip_mag += std::fabs(scale[si] * ds_r[si] / (gm * lsq));
            clip_b += std::fabs(scale[si]) * ds_b[si] / (gm * lsq);
          }
        }
        expect_within(tag + " dscale", dscale, ds_r, ds_b);
        if (with_clip) {
          // dclip: the per-group errors above times |s|, plus an fp32 sum of n * groups + 1 terms in another order.
          const double bound = clip_b + (s.n * groups + 16) * kFp32U * (clip_mag + dclip_prior);
          expect_within(tag + " dclip", dclip, {static_cast<double>(dclip_ref)}, {bound});
        }

        // determinism, and dw aliasing dwq (the trainer converts its gradient buffer in place)
        d_dclip.upload(std::vector<float>{dclip_prior});
        d_dscale.poison();
        FakeQuantBackwardArgs alias = b;
        alias.dw = d_dwq.ptr;
        cuda::fake_quant_backward(alias, nullptr);
        expect_same_bits(tag + " dw in place", d_dwq.download(), dw);
        expect_same_bits(tag + " dscale, second run", d_dscale.download(), dscale);
        expect_same_bits(tag + " dclip, second run", d_dclip.download(), dclip);
        d_wq.poison();
        cuda::fake_quant_forward({d_wq.bf16(), d_w.ptr, d_scale.ptr, with_clip ? d_clip.ptr : nullptr, s.n, s.k, s.gs,
                                  bits},
                                 nullptr);
        expect_same_bits(tag + " wq, second run", d_wq.download(), wq);
      }
    }
  }
}

TEST_CASE("fake_quant: bad arguments throw") {
  DeviceArray<float> w(4 * 128 + 4), s(16), dw(4 * 128), ds(16), clip(1), dclip(1);
  DeviceArray<uint16_t> wq(4 * 128);
  throws_with([&] { cuda::fake_quant_forward({wq.bf16(), w.ptr, s.ptr, nullptr, 4, 128, 32, 9}, nullptr); }, "bits 9");
  throws_with([&] { cuda::fake_quant_forward({wq.bf16(), w.ptr + 1, s.ptr, nullptr, 4, 128, 32, 4}, nullptr); },
              "16-byte aligned");
  throws_with(
      [&] {
        cuda::fake_quant_backward({dw.ptr, ds.ptr, dclip.ptr, dw.ptr, w.ptr, s.ptr, clip.ptr, 4, 128, 32, 4, nullptr},
                                  nullptr);
      },
      "needs scratch");
}

// ===================================================================================================== adamw

TEST_CASE("adamw_update matches the twin bit for bit, vectorised and not, with the bf16 copy") {
  for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{37}, int64_t{1000003}}) {
    for (int offset : {0, 1}) {  // offset 1: buffers not 16-byte aligned, the scalar path
      for (bool copy : {false, true}) {
        const std::string tag = fmt::format("adamw n {} offset {} bf16 copy {}", n, offset, copy);
        INFO(tag);
        const size_t len = static_cast<size_t>(n) + offset;
        std::vector<float> p = random_floats(len, 0.05f), m = random_floats(len, 1e-3f), v = random_floats(len, 1e-3f);
        for (float& x : v) x = x * x;
        DeviceArray<float> d_p(p), d_m(m), d_v(v), d_g(len);
        DeviceArray<uint16_t> d_copy(len);
        d_copy.poison();
        AdamWArgs a{};
        a.lr = 3e-4f;
        a.beta1 = 0.9f;
        a.beta2 = 0.95f;
        a.eps = 1e-8f;
        a.weight_decay = 0.1f;
        a.grad_scale = 0.7f;
        a.n = n;
        std::vector<uint16_t> copy_ref(len, 0xffff);
        for (int64_t step = 1; step <= 3; ++step) {
          const std::vector<float> g = random_floats(len, 1e-2f);
          d_g.upload(g);
          a.step = step;
          AdamWArgs ga = a;
          ga.param = d_p.ptr + offset;
          ga.m = d_m.ptr + offset;
          ga.v = d_v.ptr + offset;
          ga.grad = d_g.ptr + offset;
          ga.param_bf16 = copy ? d_copy.bf16() + offset : nullptr;
          cuda::adamw_update(ga, nullptr);
          AdamWArgs ca = a;
          ca.param = p.data() + offset;
          ca.m = m.data() + offset;
          ca.v = v.data() + offset;
          ca.grad = g.data() + offset;
          ca.param_bf16 = copy ? reinterpret_cast<__nv_bfloat16*>(copy_ref.data()) + offset : nullptr;
          cpu::adamw_update(ca);
        }
        // Both sides apply the same correctly rounded fp32 operations in the same order (kernels/adamw.cu), so
        // the bits agree; the elements before `offset` must be untouched on both.
        expect_same_bits(tag + " param", d_p.download(), p);
        expect_same_bits(tag + " m", d_m.download(), m);
        expect_same_bits(tag + " v", d_v.download(), v);
        if (copy) {
          std::vector<uint16_t> got = d_copy.download();
          std::fill(got.begin(), got.begin() + offset, 0xffff);
          expect_same_bits(tag + " bf16 copy", got, copy_ref);
        }
      }
    }
  }
}

TEST_CASE("sum_squares matches the fp64 twin within two fp32 roundings; deterministic") {
  DeviceArray<float> d_out(1), d_scratch(kSumSquaresBlocks);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{1000003}, int64_t{20000001}}) {
    for (int offset : {0, 1}) {
      const std::string tag = fmt::format("sum_squares n {} offset {}", n, offset);
      INFO(tag);
      const std::vector<float> x = random_floats(static_cast<size_t>(n) + offset, 3.0f);
      DeviceArray<float> d_x(x);
      d_out.poison();
      cuda::sum_squares({d_out.ptr, d_x.ptr + offset, n, d_scratch.ptr}, nullptr);
      const std::vector<float> got = d_out.download();
      const double ref = cpu::sum_squares(x.data() + offset, n);
      // Per-thread and per-block sums in double (error ~n 2^-53, negligible), each block's partial rounded to
      // fp32 (relative u), their double sum rounded to fp32 once more: |err| <= 2 u ref (3 u with margin).
      expect_within(tag, got, {ref}, {3 * kFp32U * ref});
      d_out.poison();
      cuda::sum_squares({d_out.ptr, d_x.ptr + offset, n, d_scratch.ptr}, nullptr);
      expect_same_bits(tag + ", second run", d_out.download(), got);
    }
  }
}
