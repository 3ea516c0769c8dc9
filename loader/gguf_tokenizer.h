// Tokenizers stored in GGUF metadata (tokenizer.ggml.*), behind qkd's Tokenizer interface:
//  - model "llama": SentencePiece-style, from tokens + scores + token types. Encoding is llama.cpp's
//    llm_tokenizer_spm: spaces become U+2581, a leading U+2581 is added at the start of the text and after
//    each special token (tokenizer.ggml.add_space_prefix, default true), adjacent pieces merge best score
//    first, and characters no piece covers fall back to <0xNN> byte tokens.
//  - model "gpt2": byte-level BPE from tokens + merges (loader/bpe_tokenizer.h).
//
// Shared rules (llama.cpp's and Hugging Face tokenizers' own):
//  - Control tokens (<|im_start|>, <s>) are recognised in the text only when parse_special is true; user-defined
//    tokens (added, non-special tokens) always are. Longest match first at each position.
//  - encode's add_bos / add_eos are requests that the model's flags gate: BOS is added only when add_bos is true
//    AND tokenizer.ggml.add_bos_token is (default true for "llama", false for "gpt2"); EOS likewise with
//    add_eos_token (default false). SmolLM2, for one, never wants a BOS.
//  - decode_token gives "" for control tokens (they are not text).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loader/tokenizer.h"

namespace qkd {

class GgufFile;

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class TokenType : int32_t { Undefined = 0, Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };

// The tokenizer metadata of a GGUF file, copied out of the mapping and validated (ids in range, array lengths
// equal).
struct GgufVocab {
  std::string source;               // the file, for messages
  std::string model;                // tokenizer.ggml.model: "llama" or "gpt2"
  std::string pre;                  // tokenizer.ggml.pre ("" when absent)
  std::vector<std::string> tokens;
  std::vector<TokenType> types;     // Normal for all when the file has no token_type
  std::vector<float> scores;        // "llama"
  std::vector<std::string> merges;  // "gpt2": "left right", best first
  int32_t bos_id = -1, eos_id = -1, eot_id = -1, eom_id = -1, unk_id = -1;
  bool add_bos = false, add_eos = false;
  bool add_space_prefix = true;     // "llama"
};

GgufVocab read_gguf_vocab(const GgufFile& f);

// Ids that end a reply: EOS, EOT, EOM, and the control tokens chat vocabularies end turns with (<|im_end|>,
// <|eot_id|>, <|endoftext|>, <|end|>, <end_of_turn>), sorted, without duplicates.
std::vector<int32_t> end_of_generation_ids(const GgufVocab& v);
std::vector<int32_t> gguf_end_of_generation_ids(const GgufFile& f);

// What the GGUF tokenizers share: the vocabulary, special-token splitting, BOS/EOS, lookups.
class VocabTokenizer : public Tokenizer {
 public:
  explicit VocabTokenizer(GgufVocab vocab);

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool add_eos = false,
                              bool parse_special = false) const final;
  int vocab_size() const final { return static_cast<int>(vocab_.tokens.size()); }
  int32_t bos_id() const final { return vocab_.bos_id; }
  int32_t eos_id() const final { return vocab_.eos_id; }
  bool is_end_of_generation(int32_t id) const final;
  int32_t piece_to_id(std::string_view piece) const final;
  std::string id_to_piece(int32_t id) const final;

  const GgufVocab& vocab() const { return vocab_; }

 protected:
  // Appends the ids of a stretch of text that holds no special token. after_special: the stretch starts the
  // text or follows a special token (SentencePiece adds its leading space there).
  virtual void encode_text(std::string_view text, bool after_special, std::vector<int32_t>& ids) const = 0;
  void check_id(int32_t id) const;

  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  using PieceMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

  GgufVocab vocab_;
  PieceMap piece_ids_;  // every token's text; the last id wins for a duplicated text, as in llama.cpp

 private:
  // Longest special token starting at text[pos] that parse_special allows, or -1; its length in *len.
  int32_t match_special(std::string_view text, size_t pos, bool parse_special, size_t* len) const;

  std::vector<std::vector<int32_t>> specials_by_first_byte_;  // [256]: control and user-defined ids, longest first
  std::vector<int32_t> end_ids_;
};

// Reads tokenizer.ggml.* and builds the tokenizer it describes. Throws qkd::Error naming the file and key for a
// missing or malformed vocabulary, and for a tokenizer model or pre-tokenizer qkd does not implement.
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& file);
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path);

}  // namespace qkd
