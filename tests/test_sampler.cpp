// The sampler (runtime/sampler.h): greedy is argmax, temperature sampling draws from the softmax (checked by
// frequencies over many draws against a 5-sigma binomial bound), top-k and top-p cut the distribution, and the
// same seed gives the same draws.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/error.h"
#include "runtime/sampler.h"

namespace {

using qkd::runtime::Sampler;
using qkd::runtime::SamplerParams;

SamplerParams params(float temperature, int top_k, float top_p, uint64_t seed = 1) {
  SamplerParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

// Draws n tokens and checks each token's frequency against want[i] within 5 binomial standard deviations.
void check_frequencies(Sampler& s, const std::vector<float>& logits, const std::vector<double>& want, int n) {
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < n; ++i) ++count[s.sample(logits)];
  for (size_t i = 0; i < want.size(); ++i) {
    const double freq = static_cast<double>(count[i]) / n;
    const double sigma = std::sqrt(want[i] * (1.0 - want[i]) / n);
    INFO("token " << i << ": frequency " << freq << ", probability " << want[i] << ", 5 sigma " << 5 * sigma);
    if (want[i] == 0.0) {
      CHECK(count[i] == 0);
    } else {
      CHECK(std::fabs(freq - want[i]) <= 5 * sigma);
    }
  }
}

std::vector<double> softmax(const std::vector<float>& logits, double temperature) {
  std::vector<double> p(logits.size());
  double z = 0.0;
  for (size_t i = 0; i < p.size(); ++i) z += (p[i] = std::exp(logits[i] / temperature));
  for (double& x : p) x /= z;
  return p;
}

TEST_CASE("argmax takes the lowest index among ties") {
  CHECK(qkd::runtime::argmax(std::vector<float>{1.0f, 3.0f, 3.0f, 0.0f}) == 1);
  CHECK(qkd::runtime::argmax(std::vector<float>{-5.0f}) == 0);
  CHECK(qkd::runtime::argmax(std::vector<float>{-std::numeric_limits<float>::infinity(), -1e30f}) == 1);
  CHECK_THROWS_AS(qkd::runtime::argmax(std::vector<float>{}), qkd::Error);
  CHECK_THROWS_WITH_AS(qkd::runtime::argmax(std::vector<float>{0.0f, NAN}), doctest::Contains("token 1 is NaN"),
                       qkd::Error);
}

TEST_CASE("greedy and top_k = 1 are the argmax") {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 3.0f);
  Sampler greedy(params(0.0f, 40, 0.9f));
  Sampler top1(params(1.5f, 1, 1.0f));
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(97);
    for (float& x : logits) x = d(rng);
    size_t best = 0;
    for (size_t i = 1; i < logits.size(); ++i)
      if (logits[i] > logits[best]) best = i;
    CHECK(greedy.sample(logits) == static_cast<int32_t>(best));
    CHECK(top1.sample(logits) == static_cast<int32_t>(best));
  }
}

TEST_CASE("temperature sampling follows the softmax") {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, -1.0f, 0.5f};
  for (float temp : {0.7f, 1.0f, 2.0f}) {
    Sampler s(params(temp, 0, 1.0f, 42));
    check_frequencies(s, logits, softmax(logits, temp), 200000);
  }
}

TEST_CASE("top-k keeps the k most likely tokens, renormalized") {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, -1.0f, 0.5f};
  Sampler s(params(1.0f, 3, 1.0f, 7));
  // the top 3 are tokens 2, 1, 4
  const std::vector<float> kept = {1.0f, 2.0f, 0.5f};
  const auto p = softmax(kept, 1.0);
  check_frequencies(s, logits, {0.0, p[0], p[1], 0.0, p[2]}, 200000);
}

TEST_CASE("top-p keeps the smallest most-likely set reaching p and excludes the tail") {
  const std::vector<double> prob = {0.15, 0.5, 0.05, 0.3};
  std::vector<float> logits;
  for (double p : prob) logits.push_back(static_cast<float>(std::log(p)));
  {
    Sampler s(params(1.0f, 0, 0.75f, 3));  // 0.5 < 0.75 <= 0.5 + 0.3: tokens 1 and 3
    check_frequencies(s, logits, {0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8}, 200000);
  }
  {
    Sampler s(params(1.0f, 0, 0.45f, 4));  // the top token alone reaches 0.45
    check_frequencies(s, logits, {0.0, 1.0, 0.0, 0.0}, 1000);
  }
  {
    Sampler s(params(1.0f, 3, 0.85f, 5));  // top-3 renormalizes to 0.15/0.95, 0.5/0.95, 0.3/0.95: 0.84 < 0.85
    check_frequencies(s, logits, {0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95}, 200000);
  }
}

TEST_CASE("top-p over a flat distribution larger than the first sorted prefix") {
  // 1000 equal logits, top_p 0.9: the nucleus is the 900 lowest ids (ties break on the id), far past the 64
  // candidates sorted first.
  const std::vector<float> logits(1000, 0.25f);
  Sampler s(params(1.0f, 0, 0.9f, 9));
  int max_seen = 0;
  for (int i = 0; i < 20000; ++i) max_seen = std::max(max_seen, static_cast<int>(s.sample(logits)));
  CHECK(max_seen == 899);
}

TEST_CASE("the same seed gives the same draws") {
  std::mt19937 rng(8);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<std::vector<float>> rows(300, std::vector<float>(64));
  for (auto& r : rows)
    for (float& x : r) x = d(rng);
  auto draw = [&](uint64_t seed) {
    Sampler s(params(0.9f, 20, 0.95f, seed));
    std::vector<int32_t> out;
    for (const auto& r : rows) out.push_back(s.sample(r));
    return out;
  };
  CHECK(draw(123) == draw(123));
  CHECK(draw(123) != draw(124));
}

TEST_CASE("invalid parameters name the flag and the value") {
  CHECK_THROWS_WITH_AS(Sampler(params(-1.0f, 0, 1.0f)), doctest::Contains("--temp -1"), qkd::Error);
  CHECK_THROWS_WITH_AS(Sampler(params(NAN, 0, 1.0f)), doctest::Contains("--temp nan"), qkd::Error);
  CHECK_THROWS_WITH_AS(Sampler(params(1.0f, -2, 1.0f)), doctest::Contains("--top-k -2"), qkd::Error);
  CHECK_THROWS_WITH_AS(Sampler(params(1.0f, 0, 0.0f)), doctest::Contains("--top-p 0"), qkd::Error);
  CHECK_THROWS_WITH_AS(Sampler(params(1.0f, 0, 1.5f)), doctest::Contains("--top-p 1.5"), qkd::Error);
  Sampler s(params(1.0f, 0, 1.0f));
  CHECK_THROWS_WITH_AS(s.sample(std::vector<float>{0.0f, NAN}), doctest::Contains("NaN"), qkd::Error);
}

}  // namespace
