#include "loader/llama2c_tokenizer.h"

#include <cstring>
#include <queue>

#include "kernels/error.h"

namespace qkd {

namespace {

constexpr int32_t kUnkId = 0;
constexpr int32_t kBosId = 1;
constexpr int32_t kEosId = 2;
constexpr int32_t kFirstByteId = 3;  // byte b is token 3 + b, after <unk>, <s>, </s>
constexpr int kMaxTokenLengthLimit = 65536;
// run.c starts its search at best_score = -1e10 and takes only strictly better pairs, so a merge whose piece
// scores -1e10 or lower never happens.
constexpr float kNoMergeScore = -1e10f;

template <typename T>
T read_le(std::string_view bytes, size_t offset) {
  T v;
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  return v;
}

}  // namespace

std::unique_ptr<Llama2cTokenizer> Llama2cTokenizer::from_bytes(const std::string& path, std::string_view bytes,
                                                               int vocab_hint) {
  QKD_CHECK(vocab_hint >= 0, "tokenizer: {}: vocab_hint {} is negative", path, vocab_hint);
  QKD_CHECK(bytes.size() >= 4, "tokenizer: {}: {} bytes is too short for a llama2.c tokenizer.bin header", path,
            bytes.size());
  std::unique_ptr<Llama2cTokenizer> t(new Llama2cTokenizer());
  t->path_ = path;
  t->max_token_length_ = read_le<int32_t>(bytes, 0);
  QKD_CHECK(t->max_token_length_ >= 1 && t->max_token_length_ <= kMaxTokenLengthLimit,
            "tokenizer: {}: max_token_length {} outside 1..{}", path, t->max_token_length_, kMaxTokenLengthLimit);

  size_t offset = 4;
  for (int i = 0; vocab_hint > 0 ? i < vocab_hint : offset < bytes.size(); ++i) {
    const size_t left = bytes.size() - offset;
    if (left < 8) {
      fail("tokenizer: {}: truncated at token {}: {} bytes left where its score and length (8 bytes) belong{}", path,
           i, left, vocab_hint > 0 ? fmt::format(" (vocab_size {} expected)", vocab_hint) : "");
    }
    const float score = read_le<float>(bytes, offset);
    const int32_t len = read_le<int32_t>(bytes, offset + 4);
    offset += 8;
    if (len < 0 || len > t->max_token_length_) {
      fail("tokenizer: {}: token {}: length {} outside 0..max_token_length {}", path, i, len, t->max_token_length_);
    }
    if (static_cast<size_t>(len) > left - 8) {
      fail("tokenizer: {}: truncated at token {}: length {} but only {} bytes left", path, i, len, left - 8);
    }
    t->pieces_.emplace_back(bytes.substr(offset, static_cast<size_t>(len)));
    t->scores_.push_back(score);
    offset += static_cast<size_t>(len);
  }
  if (offset != bytes.size()) {
    fail("tokenizer: {}: {} bytes follow the {} tokens of vocab_size {}", path, bytes.size() - offset, vocab_hint,
         vocab_hint);
  }
  const int32_t n = static_cast<int32_t>(t->pieces_.size());
  QKD_CHECK(n > kEosId, "tokenizer: {}: {} tokens; the format needs at least <unk>, <s>, </s>", path, n);

  for (int32_t id = 0; id < n; ++id) t->piece_ids_.emplace(t->pieces_[id], id);  // first (lowest) id wins
  t->has_byte_pieces_ = n >= kFirstByteId + 256;
  for (int b = 0; b < 256 && t->has_byte_pieces_; ++b) {
    t->has_byte_pieces_ = parse_byte_piece(t->pieces_[kFirstByteId + b]) == b;
  }
  return t;
}

void Llama2cTokenizer::check_id(int32_t id) const {
  QKD_CHECK(id >= 0 && id < vocab_size(), "tokenizer: {}: token id {} outside 0..{}", path_, id, vocab_size() - 1);
}

float Llama2cTokenizer::score(int32_t id) const {
  check_id(id);
  return scores_[id];
}

// The result of run.c's loop (rescan all pairs, merge the best-scoring one, leftmost on ties, until none is a
// piece) found in O(n log n) instead of O(n^2): a doubly linked list of symbols and a heap of candidate pairs
// ordered by score and then by position. A candidate is stale once either symbol has changed since it was
// pushed; symbols keep their original index, so index order is sequence order and "leftmost" is comparable.
void Llama2cTokenizer::merge_pairs(std::vector<int32_t>& tokens) const {
  struct Symbol {
    int32_t id;
    int prev, next;
    uint32_t version;  // bumped when the symbol absorbs its right neighbour or is absorbed
  };
  struct Candidate {
    float score;
    int left, right;
    uint32_t left_version, right_version;
    int32_t merged_id;
    bool operator<(const Candidate& o) const {  // the heap's top is the best score, then the leftmost
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  const int n = static_cast<int>(tokens.size());
  std::vector<Symbol> symbols(n);
  for (int i = 0; i < n; ++i) symbols[i] = {tokens[i], i - 1, i + 1 < n ? i + 1 : -1, 0};

  std::priority_queue<Candidate> heap;
  std::string joined;
  auto consider = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    joined = pieces_[symbols[left].id];
    joined += pieces_[symbols[right].id];
    const auto it = piece_ids_.find(joined);
    if (it == piece_ids_.end() || !(scores_[it->second] > kNoMergeScore)) return;
    heap.push({scores_[it->second], left, right, symbols[left].version, symbols[right].version, it->second});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i, i + 1);

  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.left];
    Symbol& right = symbols[c.right];
    if (left.version != c.left_version || right.version != c.right_version || left.next != c.right) continue;
    left.id = c.merged_id;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    ++left.version;
    ++right.version;
    consider(left.prev, c.left);
    consider(c.left, left.next);
  }
  tokens.clear();
  for (int i = n > 0 ? 0 : -1; i >= 0; i = symbols[i].next) tokens.push_back(symbols[i].id);
}

std::vector<int32_t> Llama2cTokenizer::encode(std::string_view text, bool add_bos, bool add_eos,
                                              bool /*parse_special: no control pieces are known*/) const {
  if (const int64_t bad = find_invalid_utf8(text); bad >= 0) {
    fail("prompt is not valid UTF-8: byte 0x{:02x} at offset {}", static_cast<unsigned char>(text[bad]), bad);
  }
  std::vector<int32_t> tokens;
  // run.c merges over the whole array, BOS included; BOS's "\n<s>\n" never joins a piece, but keeping it in
  // costs nothing and keeps the ids those of run.c by construction.
  if (add_bos) tokens.push_back(kBosId);

  bool last_was_unknown = false;
  auto push_char = [&](std::string_view ch) {
    const auto it = piece_ids_.find(std::string(ch));
    if (it != piece_ids_.end()) {
      tokens.push_back(it->second);
      last_was_unknown = false;
    } else if (has_byte_pieces_) {
      for (char b : ch) tokens.push_back(kFirstByteId + static_cast<unsigned char>(b));
      last_was_unknown = false;
    } else if (!last_was_unknown) {
      tokens.push_back(kUnkId);
      last_was_unknown = true;
    }
  };
  if (!text.empty()) push_char(" ");  // sentencepiece's add_dummy_prefix
  for (size_t i = 0; i < text.size();) {
    const auto len = static_cast<size_t>(utf8_char_length(text.substr(i)));  // > 0: validated above
    push_char(text.substr(i, len));
    i += len;
  }
  merge_pairs(tokens);
  if (add_eos) tokens.push_back(kEosId);
  return tokens;
}

std::string Llama2cTokenizer::decode_token(int32_t prev, int32_t id) const {
  check_id(id);
  if (id == kBosId || id == kEosId) return "";
  std::string_view piece = pieces_[id];
  const bool at_text_start = prev < 0 || prev == kBosId || prev == kEosId;
  if (at_text_start && piece.starts_with(' ')) piece.remove_prefix(1);
  if (const int byte = parse_byte_piece(piece); byte >= 0) return std::string(1, static_cast<char>(byte));
  return std::string(piece);
}

int32_t Llama2cTokenizer::piece_to_id(std::string_view piece) const {
  const auto it = piece_ids_.find(std::string(piece));
  return it == piece_ids_.end() ? -1 : it->second;
}

std::string Llama2cTokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return pieces_[id];
}

}  // namespace qkd
