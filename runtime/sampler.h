// Next-token sampling from one row of logits: greedy, or temperature softmax restricted by top-k and top-p.
//   temperature == 0           greedy: argmax, the lowest index on ties
//   top_k > 0                  keep the k most likely tokens (0 disables)
//   top_p < 1                  then keep the smallest set, most likely first, whose probability sums to >= top_p
//                              (computed on the top-k-renormalized distribution, as llama.cpp does)
// The random stream is std::mt19937_64 seeded with `seed`, turned into uniforms with a fixed 53-bit recipe, so
// the same seed gives the same tokens on every platform (std::uniform_real_distribution is not specified
// bit-for-bit).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace qkd::runtime {

struct SamplerParams {
  float temperature = 0.8f;  // --temp; 0 = greedy
  int top_k = 40;            // --top-k; 0 = off
  float top_p = 0.95f;       // --top-p; 1 = off
  uint64_t seed = 0;         // --seed
};

// Throws qkd::Error naming the flag and the value: --temp < 0 or NaN, --top-k < 0, --top-p outside (0, 1].
void validate(const SamplerParams& p);

// Index of the largest logit, the lowest index on ties. Throws on an empty row or a NaN logit.
int32_t argmax(std::span<const float> logits);

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);  // validates p

  // One token id from a row of logits [vocab_size]. Throws qkd::Error if a logit is NaN.
  int32_t sample(std::span<const float> logits);

  const SamplerParams& params() const { return params_; }

 struct Candidate {
    float logit;
    int32_t id;
  };

 private:
  double uniform();  // [0, 1)
  void sort_prefix(size_t k, size_t n);

  SamplerParams params_;
  std::mt19937_64 rng_;
  std::vector<Candidate> cand_;  // scratch, reused across calls
  std::vector<double> prob_;     // scratch: unnormalized probabilities of the sorted prefix
};

}  // namespace qkd::runtime
