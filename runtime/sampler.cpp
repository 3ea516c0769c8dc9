#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

#include "kernels/error.h"

namespace qkd::runtime {

void validate(const SamplerParams& p) {
  QKD_CHECK(p.temperature >= 0.0f, "--temp {} must be >= 0 (0 = greedy)", p.temperature);
  QKD_CHECK(std::isfinite(p.temperature), "--temp {} must be finite", p.temperature);
  QKD_CHECK(p.top_k >= 0, "--top-k {} must be >= 0 (0 = off)", p.top_k);
  QKD_CHECK(p.top_p > 0.0f && p.top_p <= 1.0f, "--top-p {} must be in (0, 1] (1 = off)", p.top_p);
}

int32_t argmax(std::span<const float> logits) {
  QKD_CHECK(!logits.empty(), "sampler: empty row of logits");
  int32_t best = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    QKD_CHECK(!std::isnan(logits[i]), "sampler: logit of token {} is NaN", i);
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);  // strict: the first maximum wins
  }
  return best;
}

Sampler::Sampler(const SamplerParams& p) : params_(p), rng_(p.seed) { validate(p); }

double Sampler::uniform() {
  // the top 53 bits of one draw, scaled into [0, 1): exact in double, identical on every platform
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

// Sorts the k most likely of the first n candidates to the front, most likely first. Ties break on the lower
// id, so the order is total and the outcome does not depend on the sort algorithm.
static bool more_likely(const Sampler::Candidate& a, const Sampler::Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

void Sampler::sort_prefix(size_t k, size_t n) {
  if (k < n) std::nth_element(cand_.begin(), cand_.begin() + k, cand_.begin() + n, more_likely);
  std::sort(cand_.begin(), cand_.begin() + k, more_likely);
}

int32_t Sampler::sample(std::span<const float> logits) {
  const int32_t best = argmax(logits);  // also rejects an empty row and NaNs
  if (params_.temperature == 0.0f || params_.top_k == 1) return best;

  const size_t vocab = logits.size();
  cand_.resize(vocab);
  for (size_t i = 0; i < vocab; ++i) cand_[i] = {logits[i], static_cast<int32_t>(i)};
  size_t n = params_.top_k > 0 ? std::min(vocab, static_cast<size_t>(params_.top_k)) : vocab;

  // Probabilities relative to the best token, so exp never overflows; the normalizer covers the top-k set.
  const double inv_temp = 1.0 / params_.temperature;
  const double max_logit = logits[best];
  if (!std::isfinite(max_logit)) return best;  // an infinite logit leaves no distribution to sample from
  auto weight = [&](float logit) { return std::exp((logit - max_logit) * inv_temp); };

  if (n < vocab) std::nth_element(cand_.begin(), cand_.begin() + n, cand_.end(), more_likely);  // top-k first
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) total += weight(cand_[i].logit);

  if (params_.top_p < 1.0f) {
    // The nucleus is a prefix of the sorted candidates. Sorting a short prefix first and widening it only when
    // the nucleus does not fit avoids sorting the whole vocabulary for every token.
    const double target = params_.top_p * total;
    size_t sorted = std::min(n, static_cast<size_t>(64));
    sort_prefix(sorted, n);
    for (;;) {
      double cum = 0.0;
      size_t keep = 0;
      while (keep < sorted && cum < target) cum += weight(cand_[keep++].logit);
      if (cum >= target || sorted == n) {
        n = keep;
        break;
      }
      sorted = std::min(n, sorted * 4);
      sort_prefix(sorted, n);
    }
  } else if (n < vocab) {
    sort_prefix(n, n);  // a fixed order for the top-k set; the full vocabulary is already in id order
  }

  prob_.resize(n);
  double cum = 0.0;
  for (size_t i = 0; i < n; ++i) prob_[i] = (cum += weight(cand_[i].logit));
  // uniform() * cum can round up to cum itself; the largest double below it still picks a token of nonzero weight
  const double u = std::min(uniform() * cum, std::nextafter(cum, 0.0));
  return cand_[std::upper_bound(prob_.begin(), prob_.end(), u) - prob_.begin()].id;
}

}  // namespace qkd::runtime
