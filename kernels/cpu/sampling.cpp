// CPU twin of next-token selection (kernels/sampling.h): greedy argmax, or temperature + top-k + top-p sampling
// by the header's exact rule, written as the plain sequential version of it: sort the pool, sum the integer
// weights in order, walk the prefix sums.
//   tokens[b] = the token chosen for row b                                              (tokens overwritten)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/error.h"
#include "kernels/sampling.h"

namespace qkd::cpu {

namespace {

int argmax_row(const float* logits, int vocab_size) {
  uint64_t best = 0;
  for (int i = 0; i < vocab_size; ++i) best = std::max(best, sampling_rank(logits[i], i));
  return sampling_rank_index(best);
}

int sample_row(const float* logits, int vocab_size, float temperature, int top_k, float top_p, float u,
               std::vector<uint64_t>& ranks, std::vector<uint64_t>& cum) {
  const int pool = std::min(top_k, vocab_size);
  ranks.resize(vocab_size);
  for (int i = 0; i < vocab_size; ++i) ranks[i] = sampling_rank(logits[i], i);
  std::partial_sort(ranks.begin(), ranks.begin() + pool, ranks.end(), std::greater<uint64_t>());

  const float z0 = logits[sampling_rank_index(ranks[0])] / temperature;
  if (!std::isfinite(z0)) return sampling_rank_index(ranks[0]);
  cum.resize(pool);
  uint64_t sum = 0;
  for (int j = 0; j < pool; ++j) {
    const float z = logits[sampling_rank_index(ranks[j])] / temperature;
    sum += sampling_weight(z - z0);
    cum[j] = sum;
  }
  int nucleus = pool;
  if (top_p < 1.0f) {
    const uint64_t threshold = sampling_nucleus_threshold(top_p, cum[pool - 1]);
    nucleus = static_cast<int>(std::lower_bound(cum.begin(), cum.begin() + pool, threshold) - cum.begin()) + 1;
  }
  const uint64_t target = sampling_target(u, cum[nucleus - 1]);
  const int j = static_cast<int>(std::upper_bound(cum.begin(), cum.begin() + nucleus, target) - cum.begin());
  return sampling_rank_index(ranks[j]);
}

}  // namespace

}  // namespace qkd::cpu

namespace qkd {

bool sampling_check(int batch, int vocab_size, int64_t ld, float temperature, int top_k, float top_p) {
  QKD_CHECK(batch >= 0 && vocab_size > 0, "sampling_forward: batch {} / vocab_size {} invalid", batch, vocab_size);
  QKD_CHECK(ld >= vocab_size, "sampling_forward: row stride ld {} is smaller than vocab_size {}", ld, vocab_size);
  QKD_CHECK(!std::isnan(temperature), "sampling_forward: temperature is NaN");
  const bool greedy = temperature <= 0.0f || top_k == 1;
  if (!greedy) {
    QKD_CHECK(top_k >= 1 && top_k <= kSamplingMaxTopK, "sampling_forward: top_k {} is outside [1, {}]", top_k,
              kSamplingMaxTopK);
    QKD_CHECK(top_p > 0.0f && top_p <= 1.0f, "sampling_forward: top_p {} is outside (0, 1]", top_p);
    QKD_CHECK(std::isfinite(temperature), "sampling_forward: temperature {} is not finite", temperature);
  }
  return greedy;
}

}  // namespace qkd

namespace qkd::cpu {

void sampling_forward(const SamplingArgs<float>& a) {
  const bool greedy = sampling_check(a.batch, a.vocab_size, a.ld, a.temperature, a.top_k, a.top_p);
  if (!greedy) {
    QKD_CHECK(a.uniform != nullptr || a.batch == 0, "sampling_forward: uniform is null with temperature {}",
              a.temperature);
  }
  std::vector<uint64_t> ranks, cum;
  for (int b = 0; b < a.batch; ++b) {
    const float* row = a.logits + b * a.ld;
    a.tokens[b] = greedy ? argmax_row(row, a.vocab_size)
                         : sample_row(row, a.vocab_size, a.temperature, a.top_k, a.top_p, a.uniform[b], ranks, cum);
  }
}

}  // namespace qkd::cpu
