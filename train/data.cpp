#include "train/data.h"

#include <algorithm>
#include <cmath>

#include "kernels/error.h"
#include "runtime/eval.h"
#include "runtime/sampler.h"

namespace qkd::train {

namespace {
uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

Windows make_windows(std::span<const int32_t> stream, int seq_len) {
  QKD_CHECK(seq_len >= 1, "make_windows: seq_len {} must be positive", seq_len);
  Windows w;
  w.seq_len = seq_len;
  for (size_t i = 0; i + static_cast<size_t>(seq_len) < stream.size(); i += static_cast<size_t>(seq_len))
    w.tokens.insert(w.tokens.end(), stream.begin() + static_cast<std::ptrdiff_t>(i),
                    stream.begin() + static_cast<std::ptrdiff_t>(i) + seq_len + 1);
  return w;
}

std::vector<int32_t> tokenize_files(const std::vector<std::string>& paths, const Tokenizer& tok) {
  return runtime::tokenize_text_files(paths, tok, "--data");
}

Windows split_off_tail(Windows& w, float fraction) {
  Windows v;
  v.seq_len = w.seq_len;
  const int64_t n = w.count();
  if (fraction <= 0.0f || n < 2) return v;
  int64_t k = static_cast<int64_t>(std::ceil(static_cast<double>(fraction) * static_cast<double>(n)));
  k = std::clamp<int64_t>(k, 1, n - 1);
  const size_t cut = static_cast<size_t>((n - k) * (w.seq_len + 1));
  v.tokens.assign(w.tokens.begin() + static_cast<std::ptrdiff_t>(cut), w.tokens.end());
  w.tokens.resize(cut);
  return v;
}

Windows sample_from_teacher(runtime::Model& teacher, int32_t bos, int n, int seq_len, uint64_t seed) {
  QKD_CHECK(seq_len + 1 <= teacher.ctx(), "--teacher-data: windows of {} tokens do not fit the teacher's context {}",
            seq_len + 1, teacher.ctx());
  const int vocab = teacher.config().vocab_size;
  Windows w;
  w.seq_len = seq_len;
  w.tokens.resize(static_cast<size_t>(n) * (seq_len + 1));
  // Sequences advance together, max_batch() at a time, one decode step per token: batched products instead of one
  // matrix-vector product per token. Sequence i has its own sampler (seed + i), so its tokens depend on i alone.
  const int group = std::max(1, teacher.max_batch());
  std::vector<float> logits;
  for (int i0 = 0; i0 < n; i0 += group) {
    const int b = std::min(group, n - i0);
    std::vector<runtime::Sampler> samplers;
    samplers.reserve(static_cast<size_t>(b));
    for (int i = 0; i < b; ++i) {
      runtime::SamplerParams sp;
      sp.temperature = 1.0f;
      sp.top_k = 0;
      sp.top_p = 1.0f;
      sp.seed = seed + static_cast<uint64_t>(i0 + i);
      samplers.emplace_back(sp);
    }
    std::vector<int32_t> cur(static_cast<size_t>(b), bos), pos(static_cast<size_t>(b), 0);
    logits.resize(static_cast<size_t>(b) * vocab);
    // No stop test: a sampled end-of-sequence token is data too, and every window needs seq_len tokens.
    for (int t = 0; t <= seq_len; ++t) {
      for (int i = 0; i < b; ++i) w.tokens[static_cast<size_t>(i0 + i) * (seq_len + 1) + t] = cur[i];
      if (t == seq_len) break;
      teacher.forward(cur, b, 1, pos, runtime::LogitsMode::Last, logits.data());
      for (int i = 0; i < b; ++i) {
        cur[i] = samplers[i].sample({logits.data() + static_cast<size_t>(i) * vocab, static_cast<size_t>(vocab)});
        pos[i] = t + 1;
      }
    }
  }
  return w;
}

StepOrder::StepOrder(int64_t n_windows, uint64_t seed) : n_(n_windows), seed_(seed) {
  QKD_CHECK(n_windows > 0, "no training windows: the data is shorter than one window of seq_len + 1 tokens");
}

const std::vector<int64_t>& StepOrder::epoch(int64_t e) {
  if (e == cached_epoch_) return perm_;
  perm_.resize(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) perm_[static_cast<size_t>(i)] = i;
  uint64_t s = seed_ ^ (0xd1b54a32d192ed03ull * static_cast<uint64_t>(e + 1));
  for (int64_t i = n_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(i + 1));
    std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
  }
  cached_epoch_ = e;
  return perm_;
}

std::vector<int64_t> StepOrder::step_windows(int64_t step, int batch) {
  std::vector<int64_t> out;
  for (int i = 0; i < batch; ++i) {
    const int64_t g = step * batch + i;
    out.push_back(epoch(g / n_)[static_cast<size_t>(g % n_)]);
  }
  return out;
}

}  // namespace qkd::train
