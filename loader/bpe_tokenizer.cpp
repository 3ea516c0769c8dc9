#include "loader/bpe_tokenizer.h"

#include <queue>

#include "kernels/error.h"
#include "loader/unicode_tables.h"

namespace qkd {

namespace {

struct CodePoint {
  uint32_t cp;
  uint32_t offset;  // byte offset in the text
};

// The text is valid UTF-8 (encode checks it before anything else).
std::vector<CodePoint> decode_utf8(std::string_view s) {
  std::vector<CodePoint> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<uint8_t>(s[i]);
    const int n = b0 < 0x80 ? 1 : b0 < 0xE0 ? 2 : b0 < 0xF0 ? 3 : 4;
    uint32_t cp = n == 1 ? b0 : n == 2 ? b0 & 0x1Fu : n == 3 ? b0 & 0x0Fu : b0 & 0x07u;
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3Fu);
    out.push_back({cp, static_cast<uint32_t>(i)});
    i += static_cast<size_t>(n);
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// GPT-2's pre-tokenizer regex on cps[begin, end), matched by hand. The alternatives are tried in order at each
// position (leftmost-first, greedy), exactly as a backtracking engine would:
//   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
// Every character is covered by one of them, so the matches tile the range.
void gpt2_split(const std::vector<CodePoint>& cps, size_t begin, size_t end, std::vector<std::pair<size_t, size_t>>& out) {
  auto flags = [&](size_t k) { return unicode_flags(cps[k].cp); };
  auto is_other = [&](size_t k) { return (flags(k) & (kLetter | kNumber | kWhitespace)) == 0; };
  size_t i = begin;
  while (i < end) {
    size_t len = 0;
    if (cps[i].cp == '\'' && i + 1 < end) {
      const uint32_t c1 = cps[i + 1].cp;
      const uint32_t c2 = i + 2 < end ? cps[i + 2].cp : 0;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') len = 2;
      else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) len = 3;
    }
    if (len == 0) {
      // " ?X+" for the three classes: an optional ASCII space, then a run of one class.
      const size_t start = cps[i].cp == ' ' && i + 1 < end ? i + 1 : i;
      const uint8_t f = flags(start);
      size_t k = start;
      if (start < end && (f & kLetter)) {
        while (k < end && (flags(k) & kLetter)) ++k;
      } else if (start < end && (f & kNumber)) {
        while (k < end && (flags(k) & kNumber)) ++k;
      } else if (start < end && is_other(start)) {
        while (k < end && is_other(k)) ++k;
      }
      if (k > start) len = k - i;
    }
    if (len == 0) {
      // cps[i] is whitespace. \s+(?!\S) takes the run but backs off one character when a non-space follows
      // (so that " word" keeps its space); when that leaves nothing, \s+ takes the single character.
      size_t k = i;
      while (k < end && (flags(k) & kWhitespace)) ++k;
      len = k - i;
      if (k < end && len >= 2) --len;
    }
    out.emplace_back(i, i + len);
    i += len;
  }
}

}  // namespace

BpePreTokenizer bpe_pretokenizer_from_name(const std::string& source, std::string_view pre) {
  if (pre == "gpt2") return BpePreTokenizer::Gpt2;
  if (pre == "smollm") return BpePreTokenizer::DigitsThenGpt2;
  if (pre.empty())
    fail("{}: tokenizer.ggml.pre is absent (llama.cpp then uses its 'default' pre-tokenizer, which qkd does not "
         "implement; smollm and gpt2 are)", source);
  fail("{}: tokenizer.ggml.pre '{}' is not a pre-tokenizer qkd implements (smollm and gpt2 are)", source, pre);
}

std::vector<std::string_view> bpe_pretokenize(std::string_view text, BpePreTokenizer pre) {
  const std::vector<CodePoint> cps = decode_utf8(text);
  std::vector<std::pair<size_t, size_t>> spans;
  if (pre == BpePreTokenizer::Gpt2) {
    gpt2_split(cps, 0, cps.size(), spans);
  } else {
    // Digits(individual_digits=True): each \p{N} character is a word of its own; the regex runs between them.
    size_t start = 0;
    for (size_t k = 0; k < cps.size(); ++k) {
      if (!(unicode_flags(cps[k].cp) & kNumber)) continue;
      gpt2_split(cps, start, k, spans);
      spans.emplace_back(k, k + 1);
      start = k + 1;
    }
    gpt2_split(cps, start, cps.size(), spans);
  }
  std::vector<std::string_view> words;
  words.reserve(spans.size());
  for (auto [a, b] : spans) {
    const size_t from = cps[a].offset;
    const size_t to = b < cps.size() ? cps[b].offset : text.size();
    words.push_back(text.substr(from, to - from));
  }
  return words;
}

uint32_t byte_to_unicode(uint8_t b) {
  // Printable Latin-1 bytes stand for themselves; the other 68 map, in order, to U+0100 and up.
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) return b;
  uint32_t n = 0;
  for (uint32_t c = 0; c < b; ++c)
    if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE)) ++n;
  return 256 + n;
}

BpeTokenizer::BpeTokenizer(GgufVocab v) : VocabTokenizer(std::move(v)) {
  const std::string& src = vocab_.source;
  pre_ = bpe_pretokenizer_from_name(src, vocab_.pre);
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = byte_to_unicode(static_cast<uint8_t>(b));
    cp_bytes_[cp] = static_cast<uint8_t>(b);
    std::string ch;
    append_utf8(ch, cp);
    byte_ids_[static_cast<size_t>(b)] = piece_to_id(ch);  // -1 when the vocabulary lacks it (see encode_word)
  }
  QKD_CHECK(piece_to_id(std::string(1, 'a')) >= 0 && piece_to_id("\xC4\xA0") >= 0,
            "{}: no tokens 'a' and '\xC4\xA0' (the byte-level space); not a byte-level BPE vocabulary", src);
  QKD_CHECK(vocab_.merges.size() < (size_t{1} << 31), "{}: {} merges", src, vocab_.merges.size());
  merges_.reserve(vocab_.merges.size());
  for (size_t r = 0; r < vocab_.merges.size(); ++r) {
    const std::string& m = vocab_.merges[r];
    const size_t sp = m.find(' ');
    QKD_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < m.size() && m.find(' ', sp + 1) == std::string::npos,
              "{}: tokenizer.ggml.merges[{}] = '{}' is not two pieces separated by one space", src, r, m);
    const std::string_view left(m.data(), sp), right(m.data() + sp + 1, m.size() - sp - 1);
    const int32_t l = piece_to_id(left), rt = piece_to_id(right);
    const int32_t result = piece_to_id(std::string(left) + std::string(right));
    QKD_CHECK(l >= 0 && rt >= 0 && result >= 0, "{}: tokenizer.ggml.merges[{}] = '{}' names a piece not in the vocabulary",
              src, r, m);
    merges_.emplace(pair_key(l, rt), Merge{static_cast<int32_t>(r), result});  // a repeated rule keeps its first rank
  }
}

void BpeTokenizer::encode_text(std::string_view text, bool, std::vector<int32_t>& ids) const {
  for (std::string_view word : bpe_pretokenize(text, pre_)) encode_word(word, ids);
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  for (char ch : word) {
    // A byte the vocabulary has no token for is dropped, and its neighbours become adjacent: what tokenizers'
    // BPE does without an unk_token, and llama.cpp too. SmolLM2 lacks 21 bytes: some C0 controls (0x04, 0x06,
    // ...) and lead bytes of 4-byte characters in unassigned planes.
    const int32_t id = byte_ids_[static_cast<uint8_t>(ch)];
    if (id < 0) continue;
    const int n = static_cast<int>(syms.size());
    syms.push_back({id, n - 1, n + 1});
  }
  if (!syms.empty()) syms.back().next = -1;
  struct Candidate {
    int32_t rank;
    int left;
    int32_t left_id, right_id;
    // The queue's top is the earliest merge rule, then the leftmost pair (tokenizers' Word::merge_all).
    bool operator<(const Candidate& o) const { return rank > o.rank || (rank == o.rank && left > o.left); }
  };
  std::priority_queue<Candidate> queue;
  auto try_add = [&](int left) {
    if (left < 0 || syms[left].next < 0) return;
    const int right = syms[left].next;
    auto it = merges_.find(pair_key(syms[left].id, syms[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, syms[left].id, syms[right].id});
  };
  for (int k = 0; k + 1 < static_cast<int>(syms.size()); ++k) try_add(k);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = syms[c.left];
    // Stale: the left symbol was merged away (id -1) or either side has changed since this pair was queued.
    if (l.id != c.left_id || l.next < 0 || syms[l.next].id != c.right_id) continue;
    Symbol& r = syms[l.next];
    l.id = merges_.at(pair_key(c.left_id, c.right_id)).result;
    r.id = -1;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    try_add(l.prev);
    try_add(c.left);
  }
  for (int k = syms.empty() ? -1 : 0; k >= 0; k = syms[k].next) ids.push_back(syms[k].id);
}

std::string BpeTokenizer::decode_token(int32_t, int32_t id) const {
  check_id(id);
  const TokenType type = vocab_.types[id];
  const std::string& piece = vocab_.tokens[id];
  if (type == TokenType::Control) return "";
  if (type == TokenType::UserDefined) return piece;  // added tokens are stored as plain text, not byte-level
  std::string out;
  for (const CodePoint& c : decode_utf8(piece)) {
    auto it = cp_bytes_.find(c.cp);
    if (it != cp_bytes_.end()) out += static_cast<char>(it->second);
    else append_utf8(out, c.cp);  // not a byte-level character: keep it as text
  }
  return out;
}

}  // namespace qkd
