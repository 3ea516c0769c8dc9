#include "loader/gguf_tokenizer.h"

#include <algorithm>
#include <array>
#include <queue>

#include "kernels/error.h"
#include "loader/bpe_tokenizer.h"
#include "loader/gguf.h"

namespace qkd {

namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

int32_t token_id(const GgufFile& f, const char* key, int32_t fallback, size_t n_tokens) {
  if (!f.has(key)) return fallback;
  const uint64_t id = f.get_uint(key);
  QKD_CHECK(id < n_tokens, "{}: key '{}' = {} is not a token id (the vocabulary has {} tokens)", f.path(), key, id,
            n_tokens);
  return static_cast<int32_t>(id);
}

// SentencePiece-style tokenizer (tokenizer.ggml.model = "llama"), as llama.cpp's llm_tokenizer_spm.
class SpmTokenizer final : public VocabTokenizer {
 public:
  explicit SpmTokenizer(GgufVocab v) : VocabTokenizer(std::move(v)) {
    const std::string& src = vocab_.source;
    QKD_CHECK(vocab_.scores.size() == vocab_.tokens.size(),
              "{}: tokenizer.ggml.scores has {} entries for {} tokens", src, vocab_.scores.size(), vocab_.tokens.size());
    for (size_t id = 0; id < vocab_.tokens.size(); ++id) {
      // Only normal pieces take part in merges: SentencePiece never builds <s> or <0x0A> out of text.
      if (vocab_.types[id] == TokenType::Normal) normal_ids_[vocab_.tokens[id]] = static_cast<int32_t>(id);
      if (vocab_.types[id] == TokenType::Byte) {
        const int b = parse_byte_piece(vocab_.tokens[id]);
        QKD_CHECK(b >= 0, "{}: byte token {} is '{}', not <0xNN>", src, id, vocab_.tokens[id]);
        byte_ids_[static_cast<size_t>(b)] = static_cast<int32_t>(id);
      }
    }
  }

  std::string decode_token(int32_t prev, int32_t id) const override {
    check_id(id);
    const TokenType type = vocab_.types[id];
    const std::string& piece = vocab_.tokens[id];
    if (type == TokenType::Control) return "";
    if (type == TokenType::Unknown) return " \xE2\x81\x87 ";  // sentencepiece's surface for <unk>: " ⁇ "
    if (type == TokenType::Byte) return std::string(1, static_cast<char>(parse_byte_piece(piece)));
    std::string_view p = piece;
    // The encoder added a space at the start of the text and after special tokens; the decoder takes it back.
    const bool at_start = prev < 0 || (prev < vocab_size() && vocab_.types[prev] == TokenType::Control);
    if (at_start && vocab_.add_space_prefix && p.starts_with(kSpaceSymbol)) p.remove_prefix(kSpaceSymbol.size());
    std::string out;
    for (size_t k = 0; k < p.size();) {
      if (p.substr(k).starts_with(kSpaceSymbol)) {
        out += ' ';
        k += kSpaceSymbol.size();
      } else {
        out += p[k++];
      }
    }
    return out;
  }

 protected:
  void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& ids) const override {
    std::string s;
    if (vocab_.add_space_prefix && after_special) s += kSpaceSymbol;
    for (char ch : text) {
      if (ch == ' ') s += kSpaceSymbol;
      else s += ch;
    }
    struct Symbol {
      int prev, next;
      size_t begin, len;  // len 0: merged into the symbol on its left
    };
    std::vector<Symbol> syms;
    for (size_t pos = 0; pos < s.size();) {
      const size_t n = static_cast<size_t>(utf8_char_length(std::string_view(s).substr(pos)));  // s is valid UTF-8
      const int k = static_cast<int>(syms.size());
      syms.push_back({k - 1, pos + n == s.size() ? -1 : k + 1, pos, n});
      pos += n;
    }
    struct Bigram {
      int left, right;
      float score;
      size_t len;
      // The queue's top is the best score, then the leftmost pair.
      bool operator<(const Bigram& o) const { return score < o.score || (score == o.score && left > o.left); }
    };
    std::priority_queue<Bigram> queue;
    auto try_add = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const std::string_view merged(s.data() + syms[left].begin, syms[left].len + syms[right].len);
      auto it = normal_ids_.find(merged);
      if (it != normal_ids_.end()) queue.push({left, right, vocab_.scores[it->second], merged.size()});
    };
    for (int k = 1; k < static_cast<int>(syms.size()); ++k) try_add(k - 1, k);
    while (!queue.empty()) {
      const Bigram b = queue.top();
      queue.pop();
      Symbol& l = syms[b.left];
      Symbol& r = syms[b.right];
      // Stale: one side has been merged away or has grown since this pair was queued.
      if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;
      l.len += r.len;
      r.len = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = b.left;
      try_add(l.prev, b.left);
      try_add(b.left, l.next);
    }
    for (int k = syms.empty() ? -1 : 0; k >= 0; k = syms[k].next) {
      const std::string_view piece(s.data() + syms[k].begin, syms[k].len);
      auto it = normal_ids_.find(piece);
      if (it != normal_ids_.end()) {
        ids.push_back(it->second);
        continue;
      }
      for (char ch : piece) {  // byte fallback; <unk> for a vocabulary without byte tokens
        const int32_t id = byte_ids_[static_cast<uint8_t>(ch)];
        QKD_CHECK(id >= 0 || vocab_.unk_id >= 0, "tokenizer {}: no token for byte 0x{:02X} and no unknown token",
                  vocab_.source, static_cast<uint8_t>(ch));
        ids.push_back(id >= 0 ? id : vocab_.unk_id);
      }
    }
  }

 private:
  PieceMap normal_ids_;
  std::array<int32_t, 256> byte_ids_ = [] {
    std::array<int32_t, 256> a{};
    a.fill(-1);
    return a;
  }();
};

// The texts chat vocabularies end a turn with; matched only on control and user-defined tokens.
constexpr std::string_view kEndOfTurnTexts[] = {"<|im_end|>",    "<|eot_id|>",    "<|eom_id|>", "<|endoftext|>",
                                                "<|end_of_text|>", "<|end|>",      "<end_of_turn>"};

}  // namespace

GgufVocab read_gguf_vocab(const GgufFile& f) {
  GgufVocab v;
  v.source = f.path();
  v.model = std::string(f.get_string("tokenizer.ggml.model"));
  QKD_CHECK(v.model == "llama" || v.model == "gpt2",
            "{}: tokenizer.ggml.model '{}' is not supported (llama and gpt2 are)", f.path(), v.model);
  v.pre = std::string(f.get_string("tokenizer.ggml.pre", ""));
  for (std::string_view t : f.get_string_array("tokenizer.ggml.tokens")) v.tokens.emplace_back(t);
  const size_t n = v.tokens.size();
  QKD_CHECK(n > 0 && n <= size_t{1} << 30, "{}: tokenizer.ggml.tokens has {} tokens", f.path(), n);
  if (f.has("tokenizer.ggml.token_type")) {
    const std::vector<int64_t> types = f.get_int_array("tokenizer.ggml.token_type");
    QKD_CHECK(types.size() == n, "{}: tokenizer.ggml.token_type has {} entries for {} tokens", f.path(), types.size(), n);
    for (size_t k = 0; k < n; ++k) {
      QKD_CHECK(types[k] >= 0 && types[k] <= 6, "{}: tokenizer.ggml.token_type[{}] = {} is not a token type (0 to 6)",
                f.path(), k, types[k]);
      v.types.push_back(static_cast<TokenType>(types[k]));
    }
  } else {
    v.types.assign(n, TokenType::Normal);
  }
  const bool spm = v.model == "llama";
  if (f.has("tokenizer.ggml.scores")) v.scores = f.get_float_array("tokenizer.ggml.scores");
  else if (spm) v.scores.assign(n, 0.0f);
  if (!spm)
    for (std::string_view m : f.get_string_array("tokenizer.ggml.merges")) v.merges.emplace_back(m);
  // Defaults are llama.cpp's for each model when the file does not say.
  v.bos_id = token_id(f, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, n);
  v.eos_id = token_id(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, n);
  v.unk_id = token_id(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, n);
  v.eot_id = token_id(f, "tokenizer.ggml.eot_token_id", -1, n);
  v.eom_id = token_id(f, "tokenizer.ggml.eom_token_id", -1, n);
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", spm);
  v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token", false);
  v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix", spm);
  QKD_CHECK(!v.add_bos || v.bos_id >= 0, "{}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id", f.path());
  QKD_CHECK(!v.add_eos || v.eos_id >= 0, "{}: tokenizer.ggml.add_eos_token is true but there is no eos_token_id", f.path());
  return v;
}

std::vector<int32_t> end_of_generation_ids(const GgufVocab& v) {
  std::vector<int32_t> ids;
  for (int32_t id : {v.eos_id, v.eot_id, v.eom_id})
    if (id >= 0) ids.push_back(id);
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    if (v.types[id] != TokenType::Control && v.types[id] != TokenType::UserDefined) continue;
    if (std::find(std::begin(kEndOfTurnTexts), std::end(kEndOfTurnTexts), v.tokens[id]) != std::end(kEndOfTurnTexts))
      ids.push_back(static_cast<int32_t>(id));
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

std::vector<int32_t> gguf_end_of_generation_ids(const GgufFile& f) {
  // Only what the end-of-generation set needs, so that a model whose tokenizer qkd cannot run still loads.
  GgufVocab v;
  const int64_t n = f.array_length("tokenizer.ggml.tokens");
  if (n > 0) {
    for (std::string_view t : f.get_string_array("tokenizer.ggml.tokens")) v.tokens.emplace_back(t);
    if (f.array_length("tokenizer.ggml.token_type") == n) {
      for (int64_t t : f.get_int_array("tokenizer.ggml.token_type")) v.types.push_back(static_cast<TokenType>(t));
    } else {
      v.types.assign(v.tokens.size(), TokenType::Normal);
    }
  }
  const size_t limit = n > 0 ? static_cast<size_t>(n) : size_t{1} << 30;
  const bool spm = f.get_string("tokenizer.ggml.model", "") == "llama";
  v.eos_id = token_id(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, limit);
  v.eot_id = token_id(f, "tokenizer.ggml.eot_token_id", -1, limit);
  v.eom_id = token_id(f, "tokenizer.ggml.eom_token_id", -1, limit);
  return end_of_generation_ids(v);
}

VocabTokenizer::VocabTokenizer(GgufVocab vocab) : vocab_(std::move(vocab)), specials_by_first_byte_(256) {
  for (size_t id = 0; id < vocab_.tokens.size(); ++id) {
    const std::string& t = vocab_.tokens[id];
    piece_ids_[t] = static_cast<int32_t>(id);
    const TokenType type = vocab_.types[id];
    if ((type == TokenType::Control || type == TokenType::UserDefined) && !t.empty())
      specials_by_first_byte_[static_cast<uint8_t>(t[0])].push_back(static_cast<int32_t>(id));
  }
  for (auto& ids : specials_by_first_byte_)
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
      return vocab_.tokens[a].size() > vocab_.tokens[b].size();
    });
  end_ids_ = end_of_generation_ids(vocab_);
}

int32_t VocabTokenizer::match_special(std::string_view text, size_t pos, bool parse_special, size_t* len) const {
  for (int32_t id : specials_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
    if (!parse_special && vocab_.types[id] == TokenType::Control) continue;
    const std::string& t = vocab_.tokens[id];
    if (text.substr(pos).starts_with(t)) {
      *len = t.size();
      return id;
    }
  }
  return -1;
}

std::vector<int32_t> VocabTokenizer::encode(std::string_view text, bool add_bos, bool add_eos,
                                            bool parse_special) const {
  const int64_t bad = find_invalid_utf8(text);
  QKD_CHECK(bad < 0, "tokenizer {}: the text is not valid UTF-8 at byte {}", vocab_.source, bad);
  std::vector<int32_t> ids;
  if (add_bos && vocab_.add_bos) ids.push_back(vocab_.bos_id);
  bool after_special = true;
  size_t start = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t len = 0;
    const int32_t id = match_special(text, pos, parse_special, &len);
    if (id < 0) {
      ++pos;
      continue;
    }
    if (pos > start) encode_text(text.substr(start, pos - start), after_special, ids);
    ids.push_back(id);
    after_special = true;
    pos += len;
    start = pos;
  }
  if (start < text.size()) encode_text(text.substr(start), after_special, ids);
  if (add_eos && vocab_.add_eos) ids.push_back(vocab_.eos_id);
  return ids;
}

bool VocabTokenizer::is_end_of_generation(int32_t id) const {
  return std::binary_search(end_ids_.begin(), end_ids_.end(), id);
}

int32_t VocabTokenizer::piece_to_id(std::string_view piece) const {
  auto it = piece_ids_.find(piece);
  return it == piece_ids_.end() ? -1 : it->second;
}

std::string VocabTokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return vocab_.tokens[id];
}

void VocabTokenizer::check_id(int32_t id) const {
  QKD_CHECK(id >= 0 && id < vocab_size(), "tokenizer {}: token id {} is outside the vocabulary (0 to {})",
            vocab_.source, id, vocab_size() - 1);
}

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& file) {
  GgufVocab v = read_gguf_vocab(file);
  if (v.model == "llama") return std::make_unique<SpmTokenizer>(std::move(v));
  return std::make_unique<BpeTokenizer>(std::move(v));
}

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path) {
  return load_gguf_tokenizer(GgufFile::open(path));
}

}  // namespace qkd
