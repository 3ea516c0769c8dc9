// GPU next-token selection (kernels/sampling.cu) against its CPU twin (kernels/cpu/sampling.cpp): the same token
// for the same logits and uniform draw, exactly, on fresh random logits (fp32 and bf16, the latter full of ties),
// for greedy and for temperature / top-k / top-p settings, including ties, NaN and infinities. The twin's answers
// are in turn checked against a naive double-precision sampler written here: the chosen token's cumulative
// probability interval within the nucleus must contain the draw (up to 1e-6, where rounding may decide).
// Outputs are poisoned first.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/cuda_check.h"
#include "tests/gpu_test_util.h"
#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/sampling.h"

using namespace qkd;

namespace {

using qkd::test::DeviceArray;

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

struct Setting {
  float temperature;
  int top_k;
  float top_p;
};

// The naive sampler in double: pool by sorting (value desc, -0 below +0, index asc; NaN as -inf), softmax weights in double,
// nucleus and draw by cumulative sums. Checks that `token` is consistent with draw u: returns "" if so.
std::string check_against_double(const float* logits, int vocab, const Setting& s, float u, int token) {
  auto val = [&](int i) { return std::isnan(logits[i]) ? -INFINITY : static_cast<double>(logits[i]); };
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  // Numeric order with -0 below +0, then lower index first.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    if (val(a) != val(b)) return val(a) > val(b);
    return !std::signbit(val(a)) && std::signbit(val(b));
  });
  if (s.temperature <= 0.0f || s.top_k == 1) {
    return token == order[0] ? "" : fmt::format("greedy chose {} (value {}), the first maximum is {}", token,
                                                val(token), order[0]);
  }
  const int pool = std::min(s.top_k, vocab);
  const double z0 = val(order[0]) / s.temperature;
  if (!std::isfinite(z0)) return token == order[0] ? "" : "non-finite top logit: expected the first token";
  std::vector<double> cum(pool);
  double sum = 0.0;
  for (int j = 0; j < pool; ++j) {
    sum += std::exp(val(order[j]) / s.temperature - z0);
    cum[j] = sum;
  }
  int nucleus = pool;
  if (s.top_p < 1.0f) {
    const double threshold = s.top_p * sum;
    nucleus = static_cast<int>(std::lower_bound(cum.begin(), cum.end(), threshold) - cum.begin()) + 1;
    // A cut within rounding of a boundary may fall either side: accept both.
    for (int j = 0; j < pool; ++j) {
      if (std::fabs(cum[j] - threshold) <= 1e-6 * sum) return "";
    }
  }
  const auto pos = std::find(order.begin(), order.begin() + nucleus, token) - order.begin();
  if (pos >= nucleus) return fmt::format("token {} is outside the double nucleus of {} tokens", token, nucleus);
  const double mass = cum[nucleus - 1];
  const double lo = pos == 0 ? 0.0 : cum[pos - 1] / mass, hi = cum[pos] / mass;
  if (u < lo - 1e-6 || u > hi + 1e-6) {
    return fmt::format("token {} (pool position {}) covers [{}, {}) but u = {}", token, pos, lo, hi, u);
  }
  return "";
}

// Runs one setting on `batch` rows of logits (fp32 or bf16 on the device) with the given draws and compares.
template <bool kBf16>
void run(const std::vector<float>& logits, int batch, int vocab, const Setting& s, const std::vector<float>& draws,
         const std::string& what) {
  INFO(what << " T=" << s.temperature << " top_k=" << s.top_k << " top_p=" << s.top_p);
  std::vector<int32_t> ref(batch);
  cpu::sampling_forward(
      {ref.data(), logits.data(), draws.data(), batch, vocab, vocab, s.temperature, s.top_k, s.top_p});

  DeviceArray<int32_t> d_tokens(batch);
  DeviceArray<float> d_uniform(draws);
  d_tokens.poison();
  if constexpr (kBf16) {
    std::vector<uint16_t> bits(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) bits[i] = float_to_bf16(logits[i]);
    DeviceArray<uint16_t> d_logits(bits);
    cuda::sampling_forward({d_tokens.ptr, reinterpret_cast<const __nv_bfloat16*>(d_logits.ptr), d_uniform.ptr, batch,
                            vocab, vocab, s.temperature, s.top_k, s.top_p},
                           nullptr);
  } else {
    DeviceArray<float> d_logits(logits);
    cuda::sampling_forward(
        {d_tokens.ptr, d_logits.ptr, d_uniform.ptr, batch, vocab, vocab, s.temperature, s.top_k, s.top_p}, nullptr);
  }
  const std::vector<int32_t> got = d_tokens.download();
  int mismatches = 0;
  std::string first;
  for (int b = 0; b < batch; ++b) {
    if (got[b] != ref[b]) {
      if (mismatches < 5) first += fmt::format("  row {}: gpu {} twin {} (u = {})\n", b, got[b], ref[b], draws[b]);
      ++mismatches;
    }
    const std::string err = check_against_double(logits.data() + static_cast<size_t>(b) * vocab, vocab, s, draws[b],
                                                 ref[b]);
    INFO("row " << b << ": " << err);
    CHECK(err.empty());
  }
  INFO(mismatches << " of " << batch << " rows differ from the twin\n" << first);
  CHECK(mismatches == 0);
}

std::vector<float> random_logits(int batch, int vocab, float scale, bool bf16_values) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(batch) * vocab);
  for (float& x : v) x = bf16_values ? bf16_to_float(float_to_bf16(d(rng()))) : d(rng());
  return v;
}

std::vector<float> random_draws(int batch) {
  std::uniform_real_distribution<float> d(0.0f, 1.0f);
  std::vector<float> u(batch);
  for (float& x : u) x = d(rng());
  return u;
}

const std::vector<Setting> kSettings = {
    {0.0f, 40, 0.9f},  {0.8f, 1, 1.0f},  {1.0f, 40, 0.9f},    {0.7f, 1024, 1.0f},
    {1.3f, 50, 0.5f},  {1.0f, 1024, 0.95f}, {0.5f, 7, 1.0f}, {2.0f, 300, 0.99f},
};

}  // namespace

TEST_CASE("sampling_forward matches the twin on fp32 logits") {
  for (int vocab : {7, 1000, 32000, 128256}) {
    const int batch = 16;
    for (const Setting& s : kSettings) {
      run<false>(random_logits(batch, vocab, 3.0f, false), batch, vocab, s, random_draws(batch),
                 fmt::format("fp32 vocab={}", vocab));
    }
  }
}

TEST_CASE("sampling_forward matches the twin on bf16 logits (many ties)") {
  for (int vocab : {1000, 32000}) {
    const int batch = 16;
    for (const Setting& s : kSettings) {
      run<true>(random_logits(batch, vocab, 2.0f, true), batch, vocab, s, random_draws(batch),
                fmt::format("bf16 vocab={}", vocab));
    }
  }
}

TEST_CASE("sampling_forward: ties, NaN and infinities") {
  const int vocab = 3000, batch = 6;
  std::vector<float> logits(static_cast<size_t>(batch) * vocab, 0.0f);  // row 0: all equal
  auto row = [&](int b) { return logits.data() + static_cast<size_t>(b) * vocab; };
  for (int i = 0; i < vocab; ++i) row(1)[i] = static_cast<float>(i % 5);  // row 1: 600-way ties at the top
  for (int i = 0; i < vocab; ++i) row(2)[i] = i % 3 == 0 ? NAN : static_cast<float>(i % 7) - 3.0f;
  for (int i = 0; i < vocab; ++i) row(3)[i] = i % 2 == 0 ? -INFINITY : 0.25f * static_cast<float>(i % 11);
  for (int i = 0; i < vocab; ++i) row(4)[i] = static_cast<float>(i % 13);
  row(4)[1234] = INFINITY;
  row(4)[2345] = INFINITY;                                                  // two +inf: the first one
  for (int i = 0; i < vocab; ++i) row(5)[i] = i == 17 ? -0.0f : (i == 900 ? 0.0f : -1.0f - i);  // -0 below +0
  for (const Setting& s : kSettings) {
    for (int round = 0; round < 4; ++round) run<false>(logits, batch, vocab, s, random_draws(batch), "special rows");
  }
  std::vector<int32_t> tokens(batch);
  cpu::sampling_forward({tokens.data(), logits.data(), nullptr, batch, vocab, vocab, 0.0f, 1, 1.0f});
  CHECK(tokens[0] == 0);
  CHECK(tokens[1] == 4);
  CHECK(tokens[4] == 1234);
  CHECK(tokens[5] == 900);
}

TEST_CASE("sampling_forward honours the row stride and rejects bad settings") {
  const int vocab = 500, ld = 512, batch = 3;
  std::vector<float> padded = random_logits(batch, ld, 2.0f, false);
  std::vector<float> dense(static_cast<size_t>(batch) * vocab);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < vocab; ++i) dense[static_cast<size_t>(b) * vocab + i] = padded[static_cast<size_t>(b) * ld + i];
    padded[static_cast<size_t>(b) * ld + vocab] = 1e30f;  // a column past vocab_size: never chosen
  }
  const std::vector<float> draws = random_draws(batch);
  const Setting s{1.0f, 100, 0.9f};
  std::vector<int32_t> ref(batch);
  cpu::sampling_forward({ref.data(), dense.data(), draws.data(), batch, vocab, vocab, s.temperature, s.top_k, s.top_p});
  DeviceArray<float> d_logits(padded), d_uniform(draws);
  DeviceArray<int32_t> d_tokens(batch);
  d_tokens.poison();
  cuda::sampling_forward({d_tokens.ptr, d_logits.ptr, d_uniform.ptr, batch, vocab, ld, s.temperature, s.top_k, s.top_p},
                         nullptr);
  CHECK(d_tokens.download() == ref);

  CHECK_THROWS_AS(cuda::sampling_forward({d_tokens.ptr, d_logits.ptr, d_uniform.ptr, batch, vocab, ld, 1.0f, 0, 0.9f},
                                         nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::sampling_forward(
                      {d_tokens.ptr, d_logits.ptr, d_uniform.ptr, batch, vocab, ld, 1.0f, kSamplingMaxTopK + 1, 0.9f},
                      nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::sampling_forward({d_tokens.ptr, d_logits.ptr, d_uniform.ptr, batch, vocab, ld, 1.0f, 40, 0.0f},
                                         nullptr),
                  Error);
  CHECK_THROWS_AS(cuda::sampling_forward({d_tokens.ptr, d_logits.ptr, nullptr, batch, vocab, ld, 1.0f, 40, 0.9f},
                                         nullptr),
                  Error);
}

TEST_CASE("sampling weights follow exp to fp32 accuracy") {
  // The rule's exp must be a faithful exp: compare floor(2^32 exp(x)) in double over the whole used range.
  for (int i = 0; i <= 23000; ++i) {
    const float x = -static_cast<float>(i) * 1e-3f;
    const double want = std::ldexp(std::exp(static_cast<double>(x)), 32);
    const double got = static_cast<double>(sampling_weight(x));
    CHECK(std::fabs(got - want) <= 4e-7 * want + 1.0);
  }
  CHECK(sampling_weight(0.0f) == (uint64_t{1} << 32));
  CHECK(sampling_weight(-23.5f) == 0);
  CHECK(sampling_weight(NAN) == 0);
  CHECK(sampling_weight(-INFINITY) == 0);
}
