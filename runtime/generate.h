// Text generation on any backend, shaped as gpt-fast's generate.py: prefill(prompt) -> decode_one_token ->
// decode_n_tokens. Batch 1 (sequence slot 0 of the model's cache).
//
// Cache contract, for chat sessions that continue across turns: generate() runs the prompt at positions
// start_pos.. and then feeds back every generated token except the last one sampled (like gpt-fast, the final
// token is never run through the model). result.n_past is the number of valid cache positions afterwards; the
// next turn passes start_pos = result.n_past and a prompt that begins with whatever the transcript needs after
// them (typically the last generated token or the stop token, then the new user text).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "runtime/model.h"
#include "runtime/sampler.h"

namespace qkd::runtime {

enum class StopReason {
  Eos,        // is_stop(token) was true; the token is in stop_token, not in tokens
  MaxTokens,  // max_new_tokens were generated
  Cancelled,  // *cancel became true
  CtxFull,    // the cache has no room for the next token
  Callback,   // on_token returned false
};
const char* stop_reason_name(StopReason r);  // "eos", "max_tokens", "cancelled", "ctx_full", "callback"

struct GenerateParams {
  int max_new_tokens = 256;                 // -n; < 0 = until a stop token or the context is full
  const std::atomic<bool>* cancel = nullptr;  // checked before the prefill and before every decode step
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids, without the prompt and without the stop token
  int32_t stop_token = -1;      // the token that ended generation when stop == Eos
  StopReason stop = StopReason::MaxTokens;
  int n_prompt = 0;             // prompt tokens prefilled
  int n_past = 0;               // valid cache positions afterwards (see the cache contract above)
  int n_decoded = 0;            // decode steps run (model forwards of one token)
  double prefill_s = 0.0;       // prefill forward + first sample
  double decode_s = 0.0;        // every later decode step and sample
  double prefill_tok_per_s() const { return prefill_s > 0.0 ? n_prompt / prefill_s : 0.0; }
  double decode_tok_per_s() const { return decode_s > 0.0 ? n_decoded / decode_s : 0.0; }
};

// Runs the prompt (positions start_pos..start_pos+n-1) and samples the first new token from its last logits.
// Throws qkd::Error "prompt has N tokens but the context (-c) is M" when it does not fit.
int32_t prefill(Model& model, Sampler& sampler, std::span<const int32_t> prompt, int start_pos,
                std::vector<float>& logits);

// Runs one token at position pos and samples the next one.
int32_t decode_one_token(Model& model, Sampler& sampler, int32_t token, int pos, std::vector<float>& logits);

// prefill, then decode until a stop condition. on_token sees each generated token as soon as it is sampled
// (return false to stop); is_stop marks end-of-generation tokens (typically Tokenizer::is_end_of_generation).
// Either callback may be empty.
GenerateResult generate(Model& model, Sampler& sampler, std::span<const int32_t> prompt, int start_pos,
                        const GenerateParams& params, const std::function<bool(int32_t)>& on_token,
                        const std::function<bool(int32_t)>& is_stop);

}  // namespace qkd::runtime
