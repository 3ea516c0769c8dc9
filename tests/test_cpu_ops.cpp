// The CPU reference ops (kernels/cpu) against naive double-precision loops written here, on fresh random inputs
// at awkward sizes. Bound: |got - ref| <= tol * mag, where mag is the sum of the magnitudes that flow into each
// output (sum |x_i w_i| for a dot product), so the bound is relative to the accumulation, not to a result that
// may cancel to near zero. tol = 1e-5: fp32 rounding (6e-8) times the accumulation lengths used here.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

constexpr double kTol = 1e-5;

std::vector<float> random_vec(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Checks every element against its reference and bound; on failure reports the worst errors and the first
// mismatches.
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
                  const std::vector<double>& mag, double tol = kTol) {
  REQUIRE(got.size() == ref.size());
  REQUIRE(mag.size() == ref.size());
  double max_abs = 0.0, max_rel = 0.0;
  int bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    const double rel = err / (mag[i] + 1e-30);
    max_abs = std::max(max_abs, err);
    max_rel = std::max(max_rel, rel);
    if (!(err <= tol * mag[i] + 1e-30)) {
      if (bad < 5) first += fmt::format("  [{}] got {} want {} (bound {:.3g})\n", i, got[i], ref[i], tol * mag[i]);
      ++bad;
    }
  }
  INFO(what << ": max abs err " << max_abs << ", max err/mag " << max_rel << ", " << bad << " of " << got.size()
            << " outside the bound\n"
            << first);
  CHECK(bad == 0);
}

// ---- matmul ----

void check_matmul(int m, int n, int k, qkd::Accumulate mode, std::mt19937& rng) {
  const auto x = random_vec(rng, static_cast<size_t>(m) * k);
  const auto w = random_vec(rng, static_cast<size_t>(n) * k);
  const auto y0 = random_vec(rng, static_cast<size_t>(m) * n);
  std::vector<float> y = y0;
  qkd::cpu::matmul_forward({y.data(), x.data(), w.data(), m, n, k, mode});
  std::vector<double> ref(y.size()), mag(y.size());
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0.0, a = 0.0;
      for (int kk = 0; kk < k; ++kk) {
        const double p = static_cast<double>(x[static_cast<size_t>(i) * k + kk]) * w[static_cast<size_t>(j) * k + kk];
        s += p;
        a += std::fabs(p);
      }
      const size_t o = static_cast<size_t>(i) * n + j;
      if (mode == qkd::Accumulate::Add) {
        s += y0[o];
        a += std::fabs(y0[o]);
      }
      ref[o] = s;
      mag[o] = a;
    }
  }
  expect_close(fmt::format("matmul {}x{}x{} {}", m, n, k, mode == qkd::Accumulate::Add ? "add" : "overwrite"), y,
               ref, mag);
}

TEST_CASE("matmul_forward matches a double-precision reference") {
  std::mt19937 rng(1);
  const int shapes[][3] = {{1, 384, 1024}, {7, 1000, 300}, {64, 513, 257}, {3, 17, 5},
                           {17, 3, 1},     {1, 1, 7},      {50, 70, 96},  {2, 129, 64}};
  for (const auto& s : shapes) {
    check_matmul(s[0], s[1], s[2], qkd::Accumulate::Overwrite, rng);
    check_matmul(s[0], s[1], s[2], qkd::Accumulate::Add, rng);
  }
}

TEST_CASE("matmul_forward: a row's result does not depend on the rest of the batch") {
  // The CPU backend relies on this: decoding a sequence alone or in a batch gives the same bits.
  std::mt19937 rng(2);
  const int m = 13, n = 77, k = 203;
  const auto x = random_vec(rng, static_cast<size_t>(m) * k);
  const auto w = random_vec(rng, static_cast<size_t>(n) * k);
  std::vector<float> batched(static_cast<size_t>(m) * n);
  qkd::cpu::matmul_forward({batched.data(), x.data(), w.data(), m, n, k});
  for (int i = 0; i < m; ++i) {
    std::vector<float> one(n);
    qkd::cpu::matmul_forward({one.data(), x.data() + static_cast<size_t>(i) * k, w.data(), 1, n, k});
    for (int j = 0; j < n; ++j) REQUIRE(one[j] == batched[static_cast<size_t>(i) * n + j]);
  }
}

TEST_CASE("matmul_forward rejects bad shapes") {
  float y[4], x[4], w[4];
  CHECK_THROWS_AS(qkd::cpu::matmul_forward({y, x, w, -1, 2, 2}), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::matmul_forward({x, x, w, 1, 1, 1}), doctest::Contains("alias"), qkd::Error);
}

// ---- rmsnorm ----

TEST_CASE("rmsnorm_forward, plain and fused with the residual add") {
  std::mt19937 rng(3);
  const float eps = 1e-5f;
  for (int rows : {1, 3, 17}) {
    for (int dim : {64, 384, 1000}) {
      for (bool fused : {false, true}) {
        auto x = random_vec(rng, static_cast<size_t>(rows) * dim, 2.0f);
        const auto x0 = x;
        const auto add = random_vec(rng, x.size());
        const auto weight = random_vec(rng, dim);
        std::vector<float> out(x.size()), rstd(rows);
        qkd::cpu::rmsnorm_forward(
            {out.data(), x.data(), fused ? add.data() : nullptr, weight.data(), rstd.data(), rows, dim, eps});

        std::vector<double> ref_out(x.size()), mag_out(x.size()), ref_x(x.size()), mag_x(x.size());
        std::vector<double> ref_rstd(rows), mag_rstd(rows);
        for (int r = 0; r < rows; ++r) {
          double ss = 0.0;
          std::vector<double> xr(dim);
          for (int i = 0; i < dim; ++i) {
            const size_t o = static_cast<size_t>(r) * dim + i;
            xr[i] = static_cast<double>(x0[o]) + (fused ? add[o] : 0.0);
            ref_x[o] = xr[i];
            mag_x[o] = std::fabs(x0[o]) + (fused ? std::fabs(add[o]) : 0.0);
            ss += xr[i] * xr[i];
          }
          const double rs = 1.0 / std::sqrt(ss / dim + eps);
          ref_rstd[r] = rs;
          mag_rstd[r] = rs;
          for (int i = 0; i < dim; ++i) {
            const size_t o = static_cast<size_t>(r) * dim + i;
            ref_out[o] = xr[i] * rs * weight[i];
            mag_out[o] = std::fabs(ref_out[o]);
          }
        }
        const std::string tag = fmt::format("rmsnorm rows {} dim {} fused {}", rows, dim, fused);
        expect_close(tag + " out", out, ref_out, mag_out);
        expect_close(tag + " rstd", rstd, ref_rstd, mag_rstd);
        expect_close(tag + " x", x, ref_x, mag_x);
      }
    }
  }
}

TEST_CASE("rmsnorm_forward rejects out aliasing x") {
  std::vector<float> x(8, 1.0f), w(8, 1.0f);
  CHECK_THROWS_AS(qkd::cpu::rmsnorm_forward({x.data(), x.data(), nullptr, w.data(), nullptr, 1, 8, 1e-5f}),
                  qkd::Error);
}

// ---- rope ----

TEST_CASE("rope_forward rotates interleaved pairs") {
  std::mt19937 rng(4);
  for (int head_dim : {64, 128}) {
    const int n_tokens = 17, n_heads = 3;
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; ++i) {
      inv_freq[i] = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * i / head_dim));
    }
    std::vector<int32_t> pos(n_tokens);
    std::uniform_int_distribution<int> pd(0, 5000);
    for (auto& p : pos) p = pd(rng);
    pos[0] = 0;
    auto x = random_vec(rng, static_cast<size_t>(n_tokens) * n_heads * head_dim);
    const auto x0 = x;
    qkd::cpu::rope_forward({x.data(), pos.data(), inv_freq.data(), n_tokens, n_heads, head_dim});
    std::vector<double> ref(x.size()), mag(x.size());
    for (int t = 0; t < n_tokens; ++t) {
      for (int h = 0; h < n_heads; ++h) {
        for (int i = 0; i < head_dim / 2; ++i) {
          const size_t o = (static_cast<size_t>(t) * n_heads + h) * head_dim + 2 * i;
          const double a = static_cast<double>(pos[t]) * inv_freq[i];
          const double c = std::cos(a), s = std::sin(a);
          ref[o] = x0[o] * c - x0[o + 1] * s;
          ref[o + 1] = x0[o] * s + x0[o + 1] * c;
          mag[o] = mag[o + 1] = std::fabs(x0[o]) + std::fabs(x0[o + 1]);
        }
      }
    }
    expect_close(fmt::format("rope head_dim {}", head_dim), x, ref, mag);
  }
}

// ---- swiglu ----

TEST_CASE("swiglu_forward, contiguous and as halves of a fused projection") {
  std::mt19937 rng(5);
  for (int rows : {1, 3, 17}) {
    for (int ffn_dim : {96, 1000}) {
      for (int64_t ld_in : {static_cast<int64_t>(ffn_dim), static_cast<int64_t>(2 * ffn_dim)}) {
        auto in = random_vec(rng, static_cast<size_t>(rows) * ld_in * 2, 4.0f);
        in[0] = -100.0f;  // exp(-g) overflows: silu's limit is -0
        in[1] = 100.0f;
        const float* gate = in.data();
        // with ld_in = 2 * ffn_dim, up is the second half of each fused row
        const float* up = ld_in == ffn_dim ? in.data() + static_cast<size_t>(rows) * ld_in : in.data() + ffn_dim;
        std::vector<float> out(static_cast<size_t>(rows) * ffn_dim);
        qkd::cpu::swiglu_forward({out.data(), gate, up, rows, ffn_dim, ld_in});
        std::vector<double> ref(out.size()), mag(out.size());
        for (int r = 0; r < rows; ++r) {
          for (int c = 0; c < ffn_dim; ++c) {
            const double g = gate[r * ld_in + c], u = up[r * ld_in + c];
            const size_t o = static_cast<size_t>(r) * ffn_dim + c;
            ref[o] = g / (1.0 + std::exp(-g)) * u;
            mag[o] = std::fabs(ref[o]);
          }
        }
        expect_close(fmt::format("swiglu rows {} ffn {} ld {}", rows, ffn_dim, ld_in), out, ref, mag);
      }
    }
  }
}

// ---- embedding ----

TEST_CASE("embedding_forward gathers rows and rejects ids outside the vocabulary") {
  std::mt19937 rng(6);
  const int vocab = 50, dim = 33;
  const auto table = random_vec(rng, static_cast<size_t>(vocab) * dim);
  const std::vector<int32_t> tokens = {0, 49, 7, 7, 13};
  std::vector<float> out(tokens.size() * dim);
  qkd::cpu::embedding_forward({out.data(), table.data(), tokens.data(), static_cast<int>(tokens.size()), dim, vocab});
  for (size_t t = 0; t < tokens.size(); ++t) {
    for (int d = 0; d < dim; ++d) REQUIRE(out[t * dim + d] == table[tokens[t] * dim + d]);
  }
  const std::vector<int32_t> bad = {3, 50};
  CHECK_THROWS_WITH_AS(qkd::cpu::embedding_forward({out.data(), table.data(), bad.data(), 2, dim, vocab}),
                       doctest::Contains("token 50"), qkd::Error);
}

// ---- attention ----

enum class KvLayout { Cache, Contiguous };  // [batch, n_kv, max_seq, hd] / [batch, seq, n_kv, hd]

void check_attention(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim,
                     const std::vector<int32_t>& start_pos, KvLayout layout, std::mt19937& rng) {
  int max_len = 0;
  for (int p : start_pos) max_len = std::max(max_len, p + seq_len);
  const int kv_len = max_len + 5;  // cache rows past the live ones hold garbage the op must not read
  int64_t bs, hs, ss;
  if (layout == KvLayout::Cache) {
    ss = head_dim;
    hs = static_cast<int64_t>(kv_len) * head_dim;
    bs = n_kv_heads * hs;
  } else {
    hs = head_dim;
    ss = static_cast<int64_t>(n_kv_heads) * head_dim;
    bs = kv_len * ss;
  }
  const auto q = random_vec(rng, static_cast<size_t>(batch) * seq_len * n_heads * head_dim);
  const auto k = random_vec(rng, static_cast<size_t>(batch) * bs);
  const auto v = random_vec(rng, static_cast<size_t>(batch) * bs);
  std::vector<float> out(q.size()), lse(static_cast<size_t>(batch) * n_heads * seq_len);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  qkd::cpu::attention_forward({out.data(), q.data(), k.data(), v.data(), lse.data(), start_pos.data(), batch,
                               seq_len, n_heads, n_kv_heads, head_dim, bs, hs, ss, scale});

  std::vector<double> ref(out.size()), mag(out.size()), ref_lse(lse.size()), mag_lse(lse.size());
  const int group = n_heads / n_kv_heads;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < seq_len; ++i) {
      for (int h = 0; h < n_heads; ++h) {
        const int g = h / group, n_keys = start_pos[b] + i + 1;
        const size_t qo = ((static_cast<size_t>(b) * seq_len + i) * n_heads + h) * head_dim;
        std::vector<double> s(n_keys);
        double mx = -1e300;
        for (int j = 0; j < n_keys; ++j) {
          double d = 0.0;
          for (int e = 0; e < head_dim; ++e) d += static_cast<double>(q[qo + e]) * k[b * bs + g * hs + j * ss + e];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        double z = 0.0;
        for (double& x : s) z += (x = std::exp(x - mx));
        for (int e = 0; e < head_dim; ++e) {
          double acc = 0.0, a = 0.0;
          for (int j = 0; j < n_keys; ++j) {
            const double vv = v[b * bs + g * hs + j * ss + e];
            acc += s[j] / z * vv;
            a += s[j] / z * std::fabs(vv);
          }
          ref[qo + e] = acc;
          mag[qo + e] = a;
        }
        const size_t lo = (static_cast<size_t>(b) * n_heads + h) * seq_len + i;
        ref_lse[lo] = mx + std::log(z);
        mag_lse[lo] = std::fabs(ref_lse[lo]) + 1.0;
      }
    }
  }
  const std::string tag = fmt::format("attention b{} s{} h{}/{} hd{} {}", batch, seq_len, n_heads, n_kv_heads,
                                      head_dim, layout == KvLayout::Cache ? "cache" : "contiguous");
  expect_close(tag + " out", out, ref, mag);
  expect_close(tag + " lse", lse, ref_lse, mag_lse);
}

TEST_CASE("attention_forward: causal GQA over both KV layouts") {
  std::mt19937 rng(7);
  for (KvLayout layout : {KvLayout::Cache, KvLayout::Contiguous}) {
    for (int head_dim : {64, 128}) {
      for (int ratio : {1, 3, 4}) {
        const int n_kv = 2, n_heads = n_kv * ratio;
        check_attention(1, 1, n_heads, n_kv, head_dim, {0}, layout, rng);       // first decode step
        check_attention(1, 17, n_heads, n_kv, head_dim, {0}, layout, rng);      // prefill
        check_attention(3, 1, n_heads, n_kv, head_dim, {5, 0, 40}, layout, rng);  // batched decode
        check_attention(3, 3, n_heads, n_kv, head_dim, {11, 2, 0}, layout, rng);  // chunked prefill
      }
    }
  }
  check_attention(2, 5, 4, 4, 36, {3, 90}, KvLayout::Cache, rng);  // head_dim not a multiple of the vector width
}

TEST_CASE("attention_forward rejects bad head counts and positions") {
  std::vector<float> buf(1024);
  const int32_t sp0 = 0, sp_neg = -1;
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_forward({buf.data(), buf.data(), buf.data(), buf.data(), nullptr, &sp0, 1,
                                                    1, 6, 4, 8, 0, 8, 8, 1.0f}),
                       doctest::Contains("n_heads 6"), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::cpu::attention_forward({buf.data(), buf.data(), buf.data(), buf.data(), nullptr, &sp_neg,
                                                    1, 1, 4, 4, 8, 0, 8, 8, 1.0f}),
                       doctest::Contains("start_pos[0] = -1"), qkd::Error);
}

}  // namespace
