// Training data: token windows from text files (qkd-eval's document rule, runtime/eval.h) or sampled from the
// teacher (data-free distillation, as in LLM-QAT), a training/validation split, and the shuffled order in which
// steps visit the windows.
//
// Windows: the token stream is cut into windows of seq_len + 1 tokens starting every seq_len tokens (a window's
// last token is the next one's first, as in evaluate()), dropping a final window shorter than seq_len + 1.
// Order: epoch e visits the training windows in a permutation drawn from (seed, e) by a Fisher-Yates shuffle
// on splitmix64 (written out here, so the order is the same with every C++ library); step s takes the
// windows s * batch .. s * batch + batch - 1 of the concatenated epochs. The order is a function of the step
// alone, which is what lets a resumed run see exactly the data an uninterrupted one would have seen.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "loader/tokenizer.h"
#include "runtime/model.h"

namespace qkd::train {

struct Windows {
  int seq_len = 0;
  std::vector<int32_t> tokens;  // [count, seq_len + 1]
  int64_t count() const { return seq_len > 0 ? static_cast<int64_t>(tokens.size()) / (seq_len + 1) : 0; }
  const int32_t* window(int64_t i) const { return tokens.data() + i * (seq_len + 1); }
};

Windows make_windows(std::span<const int32_t> stream, int seq_len);

// Reads and tokenizes the files (each must exist and hold text; an error names the file) into one stream.
std::vector<int32_t> tokenize_files(const std::vector<std::string>& paths, const Tokenizer& tok);

// Moves the last ceil(fraction * count) windows (at least one when fraction > 0 and count > 1) into a new set.
Windows split_off_tail(Windows& w, float fraction);

// n windows sampled from `teacher` (temperature 1, no top-k/top-p), each BOS then seq_len sampled tokens; window i
// from a sampler seeded seed + i. The teacher's max_batch() sequences are sampled together.
Windows sample_from_teacher(runtime::Model& teacher, int32_t bos, int n, int seq_len, uint64_t seed);

class StepOrder {
 public:
  StepOrder(int64_t n_windows, uint64_t seed);
  // The window indices of step `step`, `batch` of them.
  std::vector<int64_t> step_windows(int64_t step, int batch);

 private:
  const std::vector<int64_t>& epoch(int64_t e);
  int64_t n_;
  uint64_t seed_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace qkd::train
