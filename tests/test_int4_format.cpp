// The int4 format (kernels/int4_format.h) and its CPU twin (kernels/cpu/int4_gemm.cpp): layout, quantization
// error bounds, the bit-exact GGUF Q4_0/Q4_1 mapping, bad arguments, and the CPU int4 linear layer against a
// double-precision reference written here.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/int4_format.h"
#include "kernels/int4_gemm.h"

using namespace qkd;

namespace {

float decode(uint16_t bits, ScaleType t) { return t == ScaleType::BF16 ? bf16_to_float(bits) : fp16_to_float(bits); }
uint16_t encode(float v, ScaleType t) { return t == ScaleType::BF16 ? float_to_bf16(v) : float_to_fp16(v); }

// Nibble u of column c, read with the documented rule (even columns in nibbles 0-3, odd ones in 4-7), written
// out independently of int4_get.
uint32_t nibble_by_rule(const uint32_t* row, int c) {
  const int j = c % 8;
  const int nib = j % 2 == 0 ? j / 2 : 4 + j / 2;
  return (row[c / 8] >> (4 * nib)) & 0xF;
}

std::vector<float> random_weights(std::mt19937& rng, int n, int k, float stddev, float offset) {
  std::normal_distribution<float> d(offset, stddev);
  std::vector<float> w(static_cast<size_t>(n) * k);
  for (float& v : w) v = d(rng);
  return w;
}

// Dequantized weight computed from the buffers with the rules above, in double (exact for both symmetries).
std::vector<double> reference_dequant(const Int4HostWeight& q) {
  const int groups = q.k / q.group_size;
  std::vector<double> out(static_cast<size_t>(q.n) * q.k);
  for (int r = 0; r < q.n; ++r) {
    for (int c = 0; c < q.k; ++c) {
      const size_t gi = static_cast<size_t>(r) * groups + c / q.group_size;
      const double s = decode(q.scales[gi], q.scale_type);
      const double u = nibble_by_rule(q.packed.data() + static_cast<size_t>(r) * (q.k / 8), c);
      out[static_cast<size_t>(r) * q.k + c] =
          q.sym == Int4Symmetry::Symmetric ? s * (u - 8) : s * u + decode(q.mins[gi], q.scale_type);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("int4 layout: one word holds 8 columns, even ones in the low nibbles") {
  const uint8_t u[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  uint32_t w = 0;
  int4_pack(u, 1, 8, &w);
  // nibbles 7..0 (high to low) hold columns 7, 5, 3, 1, 6, 4, 2, 0
  CHECK(w == 0x75316420u);
  for (int c = 0; c < 8; ++c) CHECK(int4_get(&w, c) == static_cast<uint32_t>(c));
}

TEST_CASE("int4 pack/unpack round trip and sizes") {
  std::mt19937 rng(11);
  const int n = 5, k = 96;
  std::vector<uint8_t> u(n * k), back(n * k);
  for (uint8_t& v : u) v = static_cast<uint8_t>(rng() & 15);
  std::vector<uint32_t> packed(n * k / 8);
  int4_pack(u.data(), n, k, packed.data());
  int4_unpack(packed.data(), n, k, back.data());
  CHECK(u == back);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < k; ++c) REQUIRE(nibble_by_rule(packed.data() + r * (k / 8), c) == u[r * k + c]);
  }
  CHECK(int4_packed_bytes(4096, 4096) == 8388608);
  CHECK(int4_scales_bytes(4096, 4096, 128) == 262144);
  CHECK(int4_mins_bytes(4096, 4096, 128, Int4Symmetry::Symmetric) == 0);
  CHECK(int4_mins_bytes(4096, 11008, 64, Int4Symmetry::Asymmetric) == 4096 * 172 * 2);
  CHECK(int4_scales_bytes(11008, 4096, 4096) == 11008 * 2);
  CHECK(int4_group_size(kInt4PerChannel, 4096, "t") == 4096);
}

TEST_CASE("int4 symmetric quantization: error bounds and the better of the two scales") {
  std::mt19937 rng(12);
  for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
    for (int gs : {32, 64, 128, kInt4PerChannel}) {
      const int n = 7, k = 256;
      std::vector<float> w = random_weights(rng, n, k, 0.05f, 0.0f);
      for (int c = 0; c < 32; ++c) w[c] = 0.0f;  // an all-zero group: scale 0, every value exact
      const Int4HostWeight q = int4_quantize(w.data(), n, k, gs, Int4Symmetry::Symmetric, st);
      const int g = q.group_size;
      std::vector<float> deq(w.size());
      cpu::dequantize_int4(q.view(), deq.data());
      const std::vector<double> ref = reference_dequant(q);
      for (size_t i = 0; i < w.size(); ++i) REQUIRE(static_cast<double>(deq[i]) == ref[i]);
      for (int r = 0; r < n; ++r) {
        for (int g0 = 0; g0 < k; g0 += g) {
          const float* x = &w[static_cast<size_t>(r) * k + g0];
          const double s = std::fabs(decode(q.scales[static_cast<size_t>(r) * (k / g) + g0 / g], st));
          double amax = 0.0, sse = 0.0;
          for (int i = 0; i < g; ++i) {
            const double e = x[i] - ref[static_cast<size_t>(r) * k + g0 + i];
            amax = std::fmax(amax, std::fabs(x[i]));
            sse += e * e;
            // clipping at u = 15 costs at most one step; otherwise rounding costs half a step
            REQUIRE(std::fabs(e) <= s * (1.0 + 1e-6));
          }
          // never worse than the plain s = amax / 7 rule (computed here independently)
          const double s7 = decode(encode(static_cast<float>(amax / 7.0), st), st);
          double sse7 = 0.0;
          for (int i = 0; i < g; ++i) {
            const double u = s7 == 0.0 ? 0.0 : std::fmax(-8.0, std::fmin(7.0, std::nearbyint(x[i] / s7)));
            sse7 += (x[i] - s7 * u) * (x[i] - s7 * u);
          }
          CHECK(sse <= sse7 * (1.0 + 1e-9) + 1e-30);
          if (amax == 0.0) CHECK(sse == 0.0);
        }
      }
    }
  }
}

TEST_CASE("int4 asymmetric quantization: the levels cover the group, error at most half a step") {
  std::mt19937 rng(13);
  for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
    for (int gs : {32, 64, 128, kInt4PerChannel}) {
      const int n = 6, k = 384;
      std::vector<float> w = random_weights(rng, n, k, 0.03f, 0.02f);
      for (int c = 0; c < 32; ++c) w[c] = 0.75f;  // a constant group
      const Int4HostWeight q = int4_quantize(w.data(), n, k, gs, Int4Symmetry::Asymmetric, st);
      const int g = q.group_size;
      const std::vector<double> ref = reference_dequant(q);
      std::vector<float> deq(w.size());
      cpu::dequantize_int4(q.view(), deq.data());
      for (int r = 0; r < n; ++r) {
        for (int g0 = 0; g0 < k; g0 += g) {
          const size_t gi = static_cast<size_t>(r) * (k / g) + g0 / g;
          const double s = decode(q.scales[gi], st), m = decode(q.mins[gi], st);
          double lo = INFINITY, hi = -INFINITY;
          for (int i = 0; i < g; ++i) {
            const size_t idx = static_cast<size_t>(r) * k + g0 + i;
            lo = std::fmin(lo, w[idx]);
            hi = std::fmax(hi, w[idx]);
            // fma: the float result is the exact s u + m (computed in double here) rounded once
            REQUIRE(deq[idx] == static_cast<float>(ref[idx]));
            REQUIRE(std::fabs(w[idx] - ref[idx]) <= s / 2 * (1.0 + 1e-6) + 1e-12);
          }
          CHECK(m <= lo);
          CHECK(m + 15.0 * s >= hi);
        }
      }
    }
  }
}

TEST_CASE("int4 clip search (ClipMse): never worse than the full range, better with outliers, the same codes otherwise") {
  // Groups of normal values, every 16th row with a few large outliers (the case clipping is for). The squared error
  // is measured here from the buffers (reference_dequant), not taken from the quantizer.
  std::mt19937 rng(20261205);
  for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    for (ScaleType st : {ScaleType::BF16, ScaleType::FP16}) {
      for (int gs : {32, 128}) {
        CAPTURE(sym == Int4Symmetry::Symmetric);
        CAPTURE(st == ScaleType::BF16);
        CAPTURE(gs);
        const int n = 64, k = 256;
        std::vector<float> w = random_weights(rng, n, k, 0.02f, sym == Int4Symmetry::Asymmetric ? 0.005f : 0.0f);
        std::uniform_int_distribution<int> col(0, k - 1);
        for (int r = 0; r < n; r += 16) {
          for (int j = 0; j < 3; ++j) w[static_cast<size_t>(r) * k + col(rng)] = (j % 2 ? -0.15f : 0.2f);
        }
        const Int4HostWeight plain = int4_quantize(w.data(), n, k, gs, sym, st);
        const Int4HostWeight search = int4_quantize(w.data(), n, k, gs, sym, st, Int4ScaleSearch::ClipMse);
        const std::vector<double> dp = reference_dequant(plain), ds = reference_dequant(search);
        const int groups = k / gs;
        double total_plain = 0.0, total_search = 0.0;
        int worse = 0, better = 0, same_codes_when_equal = 0, equal = 0;
        for (int r = 0; r < n; ++r) {
          for (int g = 0; g < groups; ++g) {
            double ep = 0.0, es = 0.0;
            for (int c = g * gs; c < (g + 1) * gs; ++c) {
              const size_t i = static_cast<size_t>(r) * k + c;
              ep += (w[i] - dp[i]) * (w[i] - dp[i]);
              es += (w[i] - ds[i]) * (w[i] - ds[i]);
            }
            total_plain += ep;
            total_search += es;
            // the search keeps the full range unless a clipped one is strictly better (within the rounding of
            // this double sum against the quantizer's own)
            if (es > ep * (1.0 + 1e-9)) ++worse;
            if (es < ep * (1.0 - 1e-9)) ++better;
            if (es == ep) {
              ++equal;
              const size_t gi = static_cast<size_t>(r) * groups + g;
              if (search.scales[gi] == plain.scales[gi] &&
                  (sym == Int4Symmetry::Symmetric || search.mins[gi] == plain.mins[gi]))
                ++same_codes_when_equal;
            }
          }
        }
        CHECK(worse == 0);
        CHECK(better > 0);
        CHECK(total_search < total_plain);
        CHECK(same_codes_when_equal == equal);
        MESSAGE("squared error with the search / without: " << total_search / total_plain << " (" << better
                                                             << " of " << n * groups << " groups better)");
      }
    }
  }
  // None is the default and the rule of every other test in this file
  std::vector<float> w = random_weights(rng, 4, 128, 0.02f, 0.0f);
  const Int4HostWeight a = int4_quantize(w.data(), 4, 128, 32, Int4Symmetry::Symmetric, ScaleType::BF16);
  const Int4HostWeight b =
      int4_quantize(w.data(), 4, 128, 32, Int4Symmetry::Symmetric, ScaleType::BF16, Int4ScaleSearch::None);
  CHECK(a.packed == b.packed);
  CHECK(a.scales == b.scales);
}

TEST_CASE("GGUF Q4_0 and Q4_1 map bit for bit onto fp16 g32 groups") {
  std::mt19937 rng(14);
  const int n = 3, k = 96;  // 3 blocks a row
  std::uniform_real_distribution<float> ud(-0.1f, 0.1f);
  auto fill_blocks = [&](std::vector<uint8_t>& blocks, int block_bytes, int n_halves) {
    for (int b = 0; b < n * k / 32; ++b) {
      uint8_t* blk = &blocks[static_cast<size_t>(b) * block_bytes];
      for (int h = 0; h < n_halves; ++h) {
        // include a negative scale, a subnormal and a zero among the fp16 values
        uint16_t bits = float_to_fp16(ud(rng));
        if (h == 0 && b == 1) bits = 0x0003;
        if (h == 0 && b == 2) bits = 0x0000;
        std::memcpy(blk + 2 * h, &bits, 2);
      }
      for (int j = 0; j < 16; ++j) blk[2 * n_halves + j] = static_cast<uint8_t>(rng());
    }
  };
  // GGML's nibble order: byte j holds value j (low nibble) and value j + 16 (high nibble).
  auto gguf_q = [](const uint8_t* qs, int i) { return i < 16 ? qs[i] & 15 : qs[i - 16] >> 4; };

  SUBCASE("Q4_0") {
    std::vector<uint8_t> blocks(static_cast<size_t>(n) * (k / 32) * 18);
    fill_blocks(blocks, 18, 1);
    Int4HostWeight q;
    q.n = n;
    q.k = k;
    q.group_size = 32;
    q.sym = Int4Symmetry::Symmetric;
    q.scale_type = ScaleType::FP16;
    q.packed.resize(n * k / 8);
    q.scales.resize(n * k / 32);
    int4_from_q4_0(blocks.data(), n, k, q.packed.data(), q.scales.data());
    std::vector<float> deq(n * k);
    cpu::dequantize_int4(q.view(), deq.data());
    for (int b = 0; b < n * k / 32; ++b) {
      const uint8_t* blk = &blocks[static_cast<size_t>(b) * 18];
      uint16_t d;
      std::memcpy(&d, blk, 2);
      REQUIRE(q.scales[b] == d);
      for (int i = 0; i < 32; ++i) {
        const int r = b / (k / 32), c = (b % (k / 32)) * 32 + i;
        const int qv = gguf_q(blk + 2, i);
        REQUIRE(nibble_by_rule(q.packed.data() + r * (k / 8), c) == static_cast<uint32_t>(qv));
        const float expect = fp16_to_float(d) * static_cast<float>(qv - 8);  // ggml's dequantize_row_q4_0
        uint32_t a, e;
        std::memcpy(&a, &deq[r * k + c], 4);
        std::memcpy(&e, &expect, 4);
        REQUIRE(a == e);
      }
    }
  }
  SUBCASE("Q4_1") {
    std::vector<uint8_t> blocks(static_cast<size_t>(n) * (k / 32) * 20);
    fill_blocks(blocks, 20, 2);
    Int4HostWeight q;
    q.n = n;
    q.k = k;
    q.group_size = 32;
    q.sym = Int4Symmetry::Asymmetric;
    q.scale_type = ScaleType::FP16;
    q.packed.resize(n * k / 8);
    q.scales.resize(n * k / 32);
    q.mins.resize(n * k / 32);
    int4_from_q4_1(blocks.data(), n, k, q.packed.data(), q.scales.data(), q.mins.data());
    std::vector<float> deq(n * k);
    cpu::dequantize_int4(q.view(), deq.data());
    for (int b = 0; b < n * k / 32; ++b) {
      const uint8_t* blk = &blocks[static_cast<size_t>(b) * 20];
      uint16_t d, m;
      std::memcpy(&d, blk, 2);
      std::memcpy(&m, blk + 2, 2);
      REQUIRE(q.scales[b] == d);
      REQUIRE(q.mins[b] == m);
      for (int i = 0; i < 32; ++i) {
        const int r = b / (k / 32), c = (b % (k / 32)) * 32 + i;
        const int qv = gguf_q(blk + 4, i);
        REQUIRE(nibble_by_rule(q.packed.data() + r * (k / 8), c) == static_cast<uint32_t>(qv));
        // d q + m is exact in double (an 11-bit by 4-bit product plus an fp16), so this is one rounding
        const float expect = static_cast<float>(static_cast<double>(fp16_to_float(d)) * qv + fp16_to_float(m));
        REQUIRE(deq[r * k + c] == expect);
      }
    }
  }
}

TEST_CASE("CPU int4 linear layer against a double-precision reference") {
  std::mt19937 rng(15);
  const int m = 5, n = 40, k = 96;
  for (Int4Symmetry sym : {Int4Symmetry::Symmetric, Int4Symmetry::Asymmetric}) {
    for (Accumulate mode : {Accumulate::Overwrite, Accumulate::Add}) {
      const std::vector<float> w = random_weights(rng, n, k, 0.05f, 0.0f);
      const Int4HostWeight q = int4_quantize(w.data(), n, k, 32, sym, ScaleType::BF16);
      const std::vector<double> wd = reference_dequant(q);
      const std::vector<float> x = random_weights(rng, m, k, 1.0f, 0.0f);
      const std::vector<float> dy = random_weights(rng, m, n, 1.0f, 0.0f);
      const std::vector<float> y0 = random_weights(rng, m, std::max(n, k), 1.0f, 0.0f);
      std::vector<float> y(y0.begin(), y0.begin() + m * n), dx(y0.begin(), y0.begin() + m * k);
      cpu::int4_gemm_forward({y.data(), x.data(), q.view(), m, mode});
      cpu::int4_gemm_backward({dx.data(), dy.data(), q.view(), m, mode});
      double err = 0.0, norm = 0.0;
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) {
          double ref = mode == Accumulate::Add ? y0[i * n + j] : 0.0;
          for (int c = 0; c < k; ++c) ref += static_cast<double>(x[i * k + c]) * wd[j * k + c];
          err = std::fmax(err, std::fabs(y[i * n + j] - ref));
          norm = std::fmax(norm, std::fabs(ref));
        }
        for (int c = 0; c < k; ++c) {
          double ref = mode == Accumulate::Add ? y0[i * k + c] : 0.0;
          for (int j = 0; j < n; ++j) ref += static_cast<double>(dy[i * n + j]) * wd[j * k + c];
          err = std::fmax(err, std::fabs(dx[i * k + c] - ref));
          norm = std::fmax(norm, std::fabs(ref));
        }
      }
      INFO("max abs error " << err << " of max |ref| " << norm);
      CHECK(err <= 1e-5 * norm);
    }
  }
}

TEST_CASE("int4 bad arguments throw with the offending value") {
  std::vector<float> w(8 * 128, 0.1f);
  auto throws_with = [](auto&& f, const std::string& needle) {
    try {
      f();
    } catch (const Error& e) {
      INFO("message: " << std::string(e.what()));
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
      return;
    }
    FAIL("no qkd::Error thrown; expected one mentioning '" << needle << "'");
  };
  throws_with([&] { int4_quantize(w.data(), 8, 100, 32, Int4Symmetry::Symmetric, ScaleType::BF16); }, "k 100");
  throws_with([&] { int4_quantize(w.data(), 8, 128, 48, Int4Symmetry::Symmetric, ScaleType::BF16); },
              "group_size 48");
  throws_with([&] { int4_quantize(w.data(), 8, 96, 64, Int4Symmetry::Symmetric, ScaleType::BF16); },
              "not a multiple of group_size 64");
  throws_with([&] { int4_quantize(w.data(), 0, 128, 32, Int4Symmetry::Symmetric, ScaleType::BF16); }, "n 0");
  {
    std::vector<float> bad = w;
    bad[3 * 128 + 17] = NAN;
    throws_with([&] { int4_quantize(bad.data(), 8, 128, 32, Int4Symmetry::Asymmetric, ScaleType::BF16); },
                "[3, 17]");
  }
  {
    std::vector<float> big(8 * 128, 1e6f);
    throws_with([&] { int4_quantize(big.data(), 8, 128, 32, Int4Symmetry::Symmetric, ScaleType::FP16); },
                "row 0 group 0");
  }
  const Int4HostWeight q = int4_quantize(w.data(), 8, 128, 32, Int4Symmetry::Asymmetric, ScaleType::BF16);
  Int4Weight v = q.view();
  v.mins = nullptr;
  throws_with([&] { int4_check(v, "t"); }, "no mins");
  v = q.view();
  v.k = 40;
  std::vector<float> out(8 * 128);
  throws_with([&] { cpu::dequantize_int4(v, out.data()); }, "k 40");
  v = q.view();
  v.group_size = kInt4PerChannel;
  throws_with([&] { int4_check(v, "t"); }, "group_size 0");
  std::vector<uint8_t> blocks(18 * 8);
  std::vector<uint32_t> packed(16);
  std::vector<uint16_t> scales(8);
  throws_with([&] { int4_from_q4_0(blocks.data(), 1, 48, packed.data(), scales.data()); }, "[1, 48]");
  const uint8_t not_nibble[8] = {0, 1, 2, 16, 0, 0, 0, 0};
  throws_with([&] { int4_pack(not_nibble, 1, 8, packed.data()); }, "value 16");
  std::vector<float> y(8);
  throws_with([&] { cpu::int4_gemm_forward({y.data(), w.data(), q.view(), -1}); }, "m -1");
}

TEST_CASE("int4_group_shift: column >> shift is the column's group, for every group size and per-channel") {
  for (int k : {32, 96, 4096}) {
    for (int g : {32, 64, 128, k}) {
      if (k % g != 0) continue;
      CAPTURE(k);
      CAPTURE(g);
      const int shift = qkd::int4_group_shift(g, k);
      for (int c = 0; c < k; c += 7) CHECK((c >> shift) == c / g);
    }
  }
}
