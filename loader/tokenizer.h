// One tokenizer interface for every vocabulary qkd reads: sentencepiece .model files, llama2.c tokenizer.bin,
// and (loader/gguf_tokenizer.h) the tokenizers stored in GGUF metadata.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qkd {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text to ids. Throws qkd::Error if the text is not valid UTF-8 (naming the byte offset).
  // parse_special: recognise control tokens written in the text ("<|im_start|>") as single ids; used for chat
  // templates, never for untrusted user text.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos, bool add_eos = false,
                                      bool parse_special = false) const = 0;

  // The bytes that token `id` contributes when it follows `prev` (-1 at the start). SentencePiece-style
  // vocabularies drop the leading space of the first piece after BOS; byte tokens (<0x0A>) give raw bytes,
  // which may be part of a multi-byte UTF-8 character (runtime/text_stream.h assembles them).
  virtual std::string decode_token(int32_t prev, int32_t id) const = 0;

  std::string decode(std::span<const int32_t> ids) const;

  virtual int vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // True for ids that end a reply: EOS and, in chat vocabularies, the end-of-turn token.
  virtual bool is_end_of_generation(int32_t id) const { return id == eos_id(); }
  // Id of an exact piece ("<|im_end|>"), or -1.
  virtual int32_t piece_to_id(std::string_view piece) const = 0;
  virtual std::string id_to_piece(int32_t id) const = 0;
};

// Opens a tokenizer file by its contents: a sentencepiece model (protobuf) or a llama2.c tokenizer.bin.
// vocab_hint (0 = unknown) lets llama2.c's format, which has no count in its header, be read.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_hint = 0);

// Index of the first byte that breaks UTF-8, or -1 when the whole string is valid.
int64_t find_invalid_utf8(std::string_view s);

// The UTF-8 character at the start of s (Unicode Table 3-7: no overlongs, surrogates or code points past
// U+10FFFF): its length n > 0 when complete; 0 when s is empty or a well-formed but incomplete start of one;
// -k when its first k >= 1 bytes are the maximal ill-formed subpart (one U+FFFD's worth when replacing).
int utf8_char_length(std::string_view s);

// The byte a sentencepiece byte-fallback piece stands for ("<0x0A>" -> 10), or -1 for any other piece.
int parse_byte_piece(std::string_view piece);

}  // namespace qkd
