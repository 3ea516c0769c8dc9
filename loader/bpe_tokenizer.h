// Byte-level BPE (GPT-2 style; tokenizer.ggml.model = "gpt2"), equal to Hugging Face tokenizers' BPE model
// with a ByteLevel pre-tokenizer:
//  1. pre-tokenize: split the text into words with the pre-tokenizer tokenizer.ggml.pre names (below);
//  2. map each byte of a word to a printable character (GPT-2's bytes_to_unicode: 'Ġ' stands for ' ');
//  3. start from one symbol per character and repeatedly merge the adjacent pair whose merge rule comes first
//     in tokenizer.ggml.merges (the leftmost such pair on a tie) until no rule applies.
//
// Pre-tokenizers (named as in llama.cpp's llama-vocab.cpp):
//  - "gpt2":   GPT-2's regex 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//  - "smollm": every \p{N} character on its own first (tokenizers' Digits(individual_digits=True)), then the
//              GPT-2 regex inside each remaining stretch. SmolLM2, the default model, uses this one.
// The regex is matched by hand (no regex library); Unicode classes come from loader/unicode_tables.h.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loader/gguf_tokenizer.h"

namespace qkd {

enum class BpePreTokenizer { Gpt2, DigitsThenGpt2 };

// The pre-tokenizer that tokenizer.ggml.pre names; throws naming the value for one qkd does not implement.
BpePreTokenizer bpe_pretokenizer_from_name(const std::string& source, std::string_view pre);

// Splits valid UTF-8 text into the words BPE runs on (views into text, in order, covering all of it).
std::vector<std::string_view> bpe_pretokenize(std::string_view text, BpePreTokenizer pre);

// GPT-2's bytes_to_unicode: the code point that stands for byte b in byte-level pieces.
uint32_t byte_to_unicode(uint8_t b);

class BpeTokenizer final : public VocabTokenizer {
 public:
  // Throws naming the file for an unknown pre-tokenizer, a malformed merge rule, or a vocabulary that is not
  // byte-level. Bytes without a token of their own are dropped when encoding (see encode_word).
  explicit BpeTokenizer(GgufVocab vocab);

  std::string decode_token(int32_t prev, int32_t id) const override;

 protected:
  void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& ids) const override;

 private:
  struct Merge {
    int32_t rank;    // position in the merge list: lower merges first
    int32_t result;  // the merged token
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;

  BpePreTokenizer pre_;
  std::array<int32_t, 256> byte_ids_{};             // the single-character token of each byte, or -1
  std::unordered_map<uint64_t, Merge> merges_;      // (left, right) -> merge
  std::unordered_map<uint32_t, uint8_t> cp_bytes_;  // bytes_to_unicode inverted, for decoding
};

}  // namespace qkd
