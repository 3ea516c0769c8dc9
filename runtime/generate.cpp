#include "runtime/generate.h"

#include <chrono>

#include "kernels/error.h"

namespace qkd::runtime {

const char* stop_reason_name(StopReason r) {
  switch (r) {
    case StopReason::Eos: return "eos";
    case StopReason::MaxTokens: return "max_tokens";
    case StopReason::Cancelled: return "cancelled";
    case StopReason::CtxFull: return "ctx_full";
    case StopReason::Callback: return "callback";
  }
  return "?";
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool cancelled(const GenerateParams& p) { return p.cancel != nullptr && p.cancel->load(std::memory_order_relaxed); }

// Decodes until a stop condition, starting from `next`, the token sampled from the prefill. Each step first
// hands the sampled token out, then (if generation goes on) runs it through the model at position n_past.
void decode_n_tokens(Model& model, Sampler& sampler, int32_t next, const GenerateParams& params,
                     const std::function<bool(int32_t)>& on_token, const std::function<bool(int32_t)>& is_stop,
                     std::vector<float>& logits, GenerateResult& r) {
  const auto t0 = Clock::now();
  for (;;) {
    if (is_stop && is_stop(next)) {
      r.stop_token = next;
      r.stop = StopReason::Eos;
      break;
    }
    r.tokens.push_back(next);
    if (on_token && !on_token(next)) {
      r.stop = StopReason::Callback;
      break;
    }
    if (params.max_new_tokens >= 0 && static_cast<int>(r.tokens.size()) >= params.max_new_tokens) {
      r.stop = StopReason::MaxTokens;
      break;
    }
    if (cancelled(params)) {
      r.stop = StopReason::Cancelled;
      break;
    }
    if (r.n_past >= model.ctx()) {
      r.stop = StopReason::CtxFull;
      break;
    }
    next = decode_one_token(model, sampler, next, r.n_past, logits);
    ++r.n_past;
    ++r.n_decoded;
  }
  r.decode_s = seconds_since(t0);
}

}  // namespace

int32_t prefill(Model& model, Sampler& sampler, std::span<const int32_t> prompt, int start_pos,
                std::vector<float>& logits) {
  QKD_CHECK(!prompt.empty(), "generate: the prompt is empty");
  QKD_CHECK(start_pos >= 0, "generate: start_pos {} is negative", start_pos);
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (start_pos == 0) {
    QKD_CHECK(n <= model.ctx(), "prompt has {} tokens but the context (-c) is {}", n, model.ctx());
  } else {
    QKD_CHECK(start_pos + n <= model.ctx(), "prompt has {} tokens after the {} already in the cache, but the context (-c) is {}",
              n, start_pos, model.ctx());
  }
  logits.resize(model.config().vocab_size);
  const int32_t pos = start_pos;
  model.forward(prompt, 1, static_cast<int>(n), std::span<const int32_t>(&pos, 1), LogitsMode::Last, logits.data());
  return sampler.sample(logits);
}

int32_t decode_one_token(Model& model, Sampler& sampler, int32_t token, int pos, std::vector<float>& logits) {
  logits.resize(model.config().vocab_size);
  model.forward(std::span<const int32_t>(&token, 1), 1, 1, std::span<const int32_t>(&pos, 1), LogitsMode::Last,
                logits.data());
  return sampler.sample(logits);
}

GenerateResult generate(Model& model, Sampler& sampler, std::span<const int32_t> prompt, int start_pos,
                        const GenerateParams& params, const std::function<bool(int32_t)>& on_token,
                        const std::function<bool(int32_t)>& is_stop) {
  GenerateResult r;
  r.n_past = start_pos;
  if (cancelled(params)) {
    r.stop = StopReason::Cancelled;
    return r;
  }
  std::vector<float> logits;
  const auto t0 = Clock::now();
  const int32_t first = prefill(model, sampler, prompt, start_pos, logits);
  r.prefill_s = seconds_since(t0);
  r.n_prompt = static_cast<int>(prompt.size());
  r.n_past = start_pos + r.n_prompt;
  if (params.max_new_tokens == 0) {
    r.stop = StopReason::MaxTokens;
    return r;
  }
  decode_n_tokens(model, sampler, first, params, on_token, is_stop, logits, r);
  return r;
}

}  // namespace qkd::runtime
