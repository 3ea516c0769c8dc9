// A chat conversation over one model and its KV cache, and one-shot completion.
//
// Each turn formats the whole conversation with the chat template, tokenizes it, and reuses the cache for the
// longest prefix it shares with what the cache already holds, so a turn costs the prefill of its new tokens
// only. When a turn does not fit in the context, the oldest turns (never the system message) are dropped until
// it does; a single message that cannot fit gives a qkd::Error and leaves the conversation as it was.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "loader/chat_template.h"
#include "loader/tokenizer.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

namespace qkd::runtime {

using TextSink = std::function<void(std::string_view)>;

class ChatSession {
 public:
  ChatSession(Model& model, const Tokenizer& tok, Sampler& sampler, ChatTemplate tmpl, std::string system,
              GenerateParams params);

  // Runs one user turn, streaming the reply's text to `out` as complete UTF-8 characters. The reply (also a
  // cancelled or truncated one) joins the conversation.
  GenerateResult reply(const std::string& user, const TextSink& out);

  void reset();  // forget the conversation (the system message stays)
  const std::vector<ChatMessage>& messages() const { return messages_; }
  int n_past() const { return static_cast<int>(cached_.size()); }
  // Set when the last reply dropped old turns to fit the context; for a note on stderr.
  int dropped_turns() const { return dropped_; }

 private:
  std::vector<int32_t> tokenize(const std::vector<ChatMessage>& msgs) const;
  bool is_stop(int32_t id) const;

  Model& model_;
  const Tokenizer& tok_;
  Sampler& sampler_;
  ChatTemplate tmpl_;
  std::string system_;
  GenerateParams params_;
  int32_t end_of_turn_id_ = -1;
  std::vector<ChatMessage> messages_;
  std::vector<int32_t> cached_;  // the tokens whose keys/values sit in cache positions 0..n_past-1
  int dropped_ = 0;
};

// One-shot completion of raw text (no template): BOS + prompt, then generation. An empty prompt starts from BOS
// alone. Streams the generated text (not the prompt) to `out`.
GenerateResult complete(Model& model, const Tokenizer& tok, Sampler& sampler, std::string_view prompt,
                        const GenerateParams& params, const TextSink& out);

}  // namespace qkd::runtime
