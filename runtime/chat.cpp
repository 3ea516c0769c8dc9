#include "runtime/chat.h"

#include <algorithm>

#include "kernels/error.h"
#include "runtime/text_stream.h"

namespace qkd::runtime {

namespace {

// Streams token bytes as complete UTF-8 characters, skipping the stop token.
struct Streamer {
  const Tokenizer& tok;
  const TextSink& out;
  int32_t prev;
  TextStream text;

  bool operator()(int32_t id) {
    if (out) {
      const std::string s = text.push(tok.decode_token(prev, id));
      if (!s.empty()) out(s);
    }
    prev = id;
    return true;
  }
  void finish() {
    const std::string s = text.flush();
    if (out && !s.empty()) out(s);
  }
};

}  // namespace

ChatSession::ChatSession(Model& model, const Tokenizer& tok, Sampler& sampler, ChatTemplate tmpl, std::string system,
                         GenerateParams params)
    : model_(model), tok_(tok), sampler_(sampler), tmpl_(std::move(tmpl)), system_(std::move(system)),
      params_(params) {
  const std::string eot = chat_end_of_turn(tmpl_);
  if (!eot.empty()) end_of_turn_id_ = tok_.piece_to_id(eot);
  reset();
}

void ChatSession::reset() {
  messages_.clear();
  if (!system_.empty()) messages_.push_back({"system", system_});
  cached_.clear();
}

bool ChatSession::is_stop(int32_t id) const {
  return id == end_of_turn_id_ || tok_.is_end_of_generation(id);
}

std::vector<int32_t> ChatSession::tokenize(const std::vector<ChatMessage>& msgs) const {
  const std::string text = format_chat(tmpl_, msgs, /*add_generation_prompt=*/true);
  const bool special = tmpl_.kind != ChatTemplateKind::None;
  return tok_.encode(text, /*add_bos=*/!chat_template_adds_bos(tmpl_), /*add_eos=*/false, special);
}

GenerateResult ChatSession::reply(const std::string& user, const TextSink& out) {
  const int64_t bad = find_invalid_utf8(user);
  if (bad >= 0)
    fail("the message is not valid UTF-8: byte 0x{:02x} at offset {}", static_cast<unsigned char>(user[bad]), bad);
  std::vector<ChatMessage> msgs = messages_;
  msgs.push_back({"user", user});
  std::vector<int32_t> ids = tokenize(msgs);
  dropped_ = 0;
  // Leave room for at least one generated token; drop the oldest turns (after any system message) until the
  // prompt fits.
  const size_t first = (!msgs.empty() && msgs[0].role == "system") ? 1 : 0;
  while (static_cast<int>(ids.size()) >= model_.ctx() && msgs.size() > first + 1) {
    const size_t n = (msgs.size() > first + 2 && msgs[first + 1].role == "assistant") ? 2 : 1;
    msgs.erase(msgs.begin() + first, msgs.begin() + first + std::min(n, msgs.size() - first - 1));
    ++dropped_;
    ids = tokenize(msgs);
  }
  if (static_cast<int>(ids.size()) >= model_.ctx())
    fail("the message needs {} tokens but the context (-c) is {}", ids.size(), model_.ctx());

  size_t keep = 0;  // cache positions whose tokens are unchanged
  while (keep < cached_.size() && keep < ids.size() && cached_[keep] == ids[keep]) ++keep;
  if (keep == ids.size()) --keep;  // the last prompt token must run to give logits
  const std::span<const int32_t> fresh(ids.data() + keep, ids.size() - keep);

  Streamer stream{tok_, out, ids.back(), {}};
  GenerateResult r = generate(
      model_, sampler_, fresh, static_cast<int>(keep), params_, [&](int32_t id) { return stream(id); },
      [this](int32_t id) { return is_stop(id); });
  stream.finish();

  std::vector<int32_t> transcript = ids;
  transcript.insert(transcript.end(), r.tokens.begin(), r.tokens.end());
  if (r.stop == StopReason::Eos) transcript.push_back(r.stop_token);
  transcript.resize(std::min<size_t>(transcript.size(), static_cast<size_t>(r.n_past)));
  cached_ = std::move(transcript);

  msgs.push_back({"assistant", tok_.decode(r.tokens)});
  messages_ = std::move(msgs);
  return r;
}

GenerateResult complete(Model& model, const Tokenizer& tok, Sampler& sampler, std::string_view prompt,
                        const GenerateParams& params, const TextSink& out) {
  std::vector<int32_t> ids = tok.encode(prompt, /*add_bos=*/true);
  if (static_cast<int>(ids.size()) >= model.ctx())
    fail("prompt has {} tokens but the context (-c) is {}", ids.size(), model.ctx());
  Streamer stream{tok, out, ids.back(), {}};
  GenerateResult r = generate(
      model, sampler, ids, 0, params, [&](int32_t id) { return stream(id); },
      [&tok](int32_t id) { return tok.is_end_of_generation(id); });
  stream.finish();
  return r;
}

}  // namespace qkd::runtime
