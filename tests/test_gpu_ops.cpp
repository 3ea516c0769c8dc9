// The elementwise CUDA ops (embedding, RMSNorm + residual, RoPE, SwiGLU; kernels/*.cu) against their CPU twins
// (kernels/cpu/*.cpp) on the same bf16-representable inputs, fresh random values each run, at awkward sizes
// (1 and 3 rows, widths that exercise every vectors-per-thread variant). Outputs are poisoned with NaN first, so
// an element the kernel never writes fails. Bounds come from precision: the kernels compute in fp32 and round
// each stored value to bf16 once (relative error <= 2^-8), so |got - ref| <= k * 2^-8 |ref| + a small floor,
// with k the number of bf16 roundings on the path (2 for RMSNorm's rounded residual, 1 otherwise).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/cuda_check.h"
#include "tests/gpu_test_util.h"
#include "kernels/dtype.h"
#include "kernels/embedding.h"
#include "kernels/error.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"

using namespace qkd;

namespace {

constexpr double kBf16Eps = 1.0 / 256.0;  // bf16 unit roundoff: 8 significant bits

using qkd::test::DeviceArray;

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

// Random bf16 values: the bits for the device and the same values as floats for the twin.
std::vector<uint16_t> random_bf16(size_t count, std::vector<float>& values, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<uint16_t> bits(count);
  values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    bits[i] = float_to_bf16(d(rng()));
    values[i] = bf16_to_float(bits[i]);
  }
  return bits;
}

std::vector<float> to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = bf16_to_float(bits[i]);
  return f;
}

// |got - ref| <= rel * |ref| + abs for every element (NaN fails); reports max abs/rel error, the error norm
// relative to the reference norm, and the first mismatches.
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref, double rel,
                  double abs) {
  REQUIRE(got.size() == ref.size());
  double max_abs = 0.0, max_rel = 0.0, err2 = 0.0, ref2 = 0.0;
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    err2 += err * err;
    ref2 += static_cast<double>(ref[i]) * ref[i];
    max_abs = std::max(max_abs, err);
    if (ref[i] != 0.0f) max_rel = std::max(max_rel, err / std::fabs(ref[i]));
    if (!(err <= rel * std::fabs(ref[i]) + abs)) {
      if (bad < 5) first += fmt::format("  [{}] got {} want {}\n", i, got[i], ref[i]);
      ++bad;
    }
  }
  const double norm_rel = std::sqrt(err2 / std::max(ref2, 1e-300));
  MESSAGE(what << ": max abs " << max_abs << ", max rel " << max_rel << ", norm rel " << norm_rel);
  INFO(what << ": " << bad << " of " << got.size() << " outside " << rel << "*|ref| + " << abs << "\n" << first);
  CHECK(bad == 0);
}

double max_abs_of(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

}  // namespace

TEST_CASE("embedding_forward copies table rows exactly") {
  for (int n_tokens : {1, 3, 100}) {
    for (int dim : {8, 4096}) {
      const int vocab = 50;
      std::vector<float> table_f;
      const std::vector<uint16_t> table = random_bf16(static_cast<size_t>(vocab) * dim, table_f);
      std::vector<int32_t> tokens(n_tokens);
      std::uniform_int_distribution<int> pick(0, vocab - 1);
      for (int32_t& t : tokens) t = pick(rng());
      DeviceArray<uint16_t> d_table(table), d_out(static_cast<size_t>(n_tokens) * dim);
      DeviceArray<int32_t> d_tokens(tokens);
      d_out.poison();
      cuda::embedding_forward({d_out.bf16(), d_table.bf16(), d_tokens.ptr, n_tokens, dim, vocab}, nullptr);
      std::vector<float> ref(static_cast<size_t>(n_tokens) * dim);
      cpu::embedding_forward({ref.data(), table_f.data(), tokens.data(), n_tokens, dim, vocab});
      expect_close(fmt::format("embedding n_tokens={} dim={}", n_tokens, dim), to_float(d_out.download()), ref, 0.0,
                   0.0);
    }
  }
}

TEST_CASE("embedding_forward fills the row of an out-of-range id with NaN and rejects bad shapes") {
  const int dim = 16, vocab = 4;
  std::vector<float> table_f;
  DeviceArray<uint16_t> d_table(random_bf16(static_cast<size_t>(vocab) * dim, table_f)), d_out(2 * dim);
  DeviceArray<int32_t> d_tokens(std::vector<int32_t>{1, vocab});
  cuda::embedding_forward({d_out.bf16(), d_table.bf16(), d_tokens.ptr, 2, dim, vocab}, nullptr);
  const std::vector<float> out = to_float(d_out.download());
  for (int c = 0; c < dim; ++c) {
    CHECK(out[c] == table_f[dim + c]);
    CHECK(std::isnan(out[dim + c]));
  }
  CHECK_THROWS_AS(cuda::embedding_forward({d_out.bf16(), d_table.bf16(), d_tokens.ptr, 2, 12, vocab}, nullptr),
                  Error);
}

TEST_CASE("rmsnorm_forward matches the twin, with and without the residual add") {
  // dim 8200 and 32776 need 2 and 8 vectors per thread; the others one.
  for (int rows : {1, 3, 64}) {
    for (int dim : {8, 384, 4096, 8200, 32776}) {
      for (bool with_add : {false, true}) {
        const size_t n = static_cast<size_t>(rows) * dim;
        std::vector<float> x_f, add_f, w_f;
        const std::vector<uint16_t> x = random_bf16(n, x_f, 3.0f), add = random_bf16(n, add_f),
                                    w = random_bf16(dim, w_f);
        DeviceArray<uint16_t> d_x(x), d_add(add), d_w(w), d_out(n);
        DeviceArray<float> d_rstd(rows);
        d_out.poison();
        d_rstd.poison();
        const float eps = 1e-5f;
        cuda::rmsnorm_forward({d_out.bf16(), d_x.bf16(), with_add ? d_add.bf16() : nullptr, d_w.bf16(), d_rstd.ptr,
                               rows, dim, eps},
                              nullptr);
        // The op on bf16 storage: the updated residual is x + add rounded to bf16, and out normalises that
        // stored residual (kernels/rmsnorm.cu). The reference runs the twin on the same rounded residual, so out
        // differs from it by its own final rounding only, whatever dim (at dim 8 one rounded element moves rstd).
        std::vector<float> x_sum = x_f, x_stored = x_f;
        if (with_add) {
          for (size_t i = 0; i < n; ++i) {
            x_sum[i] = x_f[i] + add_f[i];
            x_stored[i] = bf16_to_float(float_to_bf16(x_sum[i]));
          }
        }
        std::vector<float> out_ref(n), rstd_ref(rows);
        cpu::rmsnorm_forward({out_ref.data(), x_stored.data(), nullptr, w_f.data(), rstd_ref.data(), rows, dim, eps});
        const std::string what = fmt::format("rmsnorm rows={} dim={} add={}", rows, dim, with_add);
        // x: the fp32 sum rounded once; out: its own rounding; rstd: fp32 sums of the same residual.
        expect_close(what + " x", to_float(d_x.download()), x_sum, with_add ? kBf16Eps : 0.0, 0.0);
        expect_close(what + " out", to_float(d_out.download()), out_ref, kBf16Eps * 1.05, 1e-6 * max_abs_of(out_ref));
        expect_close(what + " rstd", d_rstd.download(), rstd_ref, 1e-5, 0.0);
      }
    }
  }
}

TEST_CASE("rmsnorm_forward rejects unsupported shapes") {
  DeviceArray<uint16_t> d(64);
  CHECK_THROWS_AS(cuda::rmsnorm_forward({d.bf16(), d.bf16() + 32, nullptr, d.bf16(), nullptr, 1, 12, 1e-5f}, nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::rmsnorm_forward({d.bf16(), d.bf16(), nullptr, d.bf16(), nullptr, 1, 16, 1e-5f}, nullptr),
                  Error);
}

TEST_CASE("rope_forward matches the twin at large positions") {
  struct Shape {
    int n_tokens, n_heads, head_dim;
  };
  for (const Shape s : {Shape{1, 32, 128}, Shape{3, 8, 64}, Shape{17, 4, 2}, Shape{5, 3, 8}, Shape{2, 5, 24}}) {
    const size_t n = static_cast<size_t>(s.n_tokens) * s.n_heads * s.head_dim;
    std::vector<float> x_f;
    const std::vector<uint16_t> x = random_bf16(n, x_f);
    std::vector<int32_t> positions(s.n_tokens);
    std::uniform_int_distribution<int> pick(0, 100000);  // past 2^16: where an fp32 angle alone drifts
    for (int32_t& p : positions) p = pick(rng());
    positions[0] = 0;
    std::vector<float> inv_freq(s.head_dim / 2);
    for (int i = 0; i < s.head_dim / 2; ++i) {
      inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / s.head_dim));
    }
    DeviceArray<uint16_t> d_x(x);
    DeviceArray<int32_t> d_pos(positions);
    DeviceArray<float> d_freq(inv_freq);
    cuda::rope_forward({d_x.bf16(), d_pos.ptr, d_freq.ptr, s.n_tokens, s.n_heads, s.head_dim}, nullptr);
    cpu::rope_forward({x_f.data(), positions.data(), inv_freq.data(), s.n_tokens, s.n_heads, s.head_dim});
    // One bf16 rounding, plus cos/sin that agree to a few fp32 ulps even at 1e5 rad (a bare fp32 angle would be
    // off by up to 4e-3 there).
    expect_close(fmt::format("rope n_tokens={} n_heads={} head_dim={}", s.n_tokens, s.n_heads, s.head_dim),
                 to_float(d_x.download()), x_f, kBf16Eps * 1.05, 1e-6 * max_abs_of(x_f));
  }
}

TEST_CASE("swiglu_forward matches the twin, contiguous and as the halves of a fused projection") {
  for (int rows : {1, 3, 37}) {
    for (int ffn_dim : {8, 1000, 11008}) {
      for (bool fused : {false, true}) {
        const int64_t ld_in = fused ? 2 * ffn_dim : ffn_dim;
        std::vector<float> gate_f, up_f;
        // Fused: one [rows, 2 * ffn_dim] buffer, gate = columns [0, ffn_dim), up = [ffn_dim, 2 ffn_dim).
        const std::vector<uint16_t> gate = random_bf16(static_cast<size_t>(rows) * ld_in, gate_f, 3.0f);
        const std::vector<uint16_t> up = random_bf16(static_cast<size_t>(rows) * ld_in, up_f);
        DeviceArray<uint16_t> d_gate(gate), d_up(up), d_out(static_cast<size_t>(rows) * ffn_dim);
        d_out.poison();
        const int64_t up_off = fused ? ffn_dim : 0;
        cuda::swiglu_forward({d_out.bf16(), d_gate.bf16(), (fused ? d_gate.bf16() : d_up.bf16()) + up_off, rows,
                              ffn_dim, ld_in},
                             nullptr);
        std::vector<float> ref(static_cast<size_t>(rows) * ffn_dim);
        cpu::swiglu_forward(
            {ref.data(), gate_f.data(), (fused ? gate_f.data() : up_f.data()) + up_off, rows, ffn_dim, ld_in});
        expect_close(fmt::format("swiglu rows={} ffn_dim={} fused={}", rows, ffn_dim, fused),
                     to_float(d_out.download()), ref, kBf16Eps * 1.05, 1e-6 * max_abs_of(ref));
      }
    }
  }
}
