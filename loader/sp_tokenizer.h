// A sentencepiece model (.model: a serialized ModelProto) read through the sentencepiece library, so that ids
// match Python's sentencepiece and Meta's LLaMA reference exactly.
//
// Behaviour beyond the library's own Encode/DecodeIds:
// - encode(parse_special = true) splits the text at the exact text of the vocabulary's control pieces (<s>, </s>)
//   and encodes every stretch between them on its own, each with sentencepiece's dummy prefix; this is how Meta's
//   Llama-2 chat code builds a dialog ([BOS] + encode(turn) + [EOS] per turn). Other text is not special.
// - decode_token(prev, id): control pieces give ""; byte pieces <0xNN> give the raw byte; <unk> gives the
//   library's unknown surface (" ⁇ "); other pieces give their text with U+2581 as ' ', minus the leading space
//   when nothing has been written yet (prev = -1 or a control piece such as BOS), as DecodeIds does for models
//   with add_dummy_prefix. decode(ids) therefore equals DecodeIds(ids) whenever the byte pieces form valid UTF-8
//   (DecodeIds writes U+FFFD for bad bytes, decode keeps them raw for runtime/text_stream.h).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "loader/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace qkd {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // bytes: the serialized ModelProto; path names the file in errors.
  static std::unique_ptr<SentencePieceTokenizer> from_bytes(const std::string& path, std::string_view bytes);
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool add_eos = false,
                              bool parse_special = false) const override;
  std::string decode_token(int32_t prev, int32_t id) const override;
  int vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  int32_t piece_to_id(std::string_view piece) const override;
  std::string id_to_piece(int32_t id) const override;

 private:
  SentencePieceTokenizer() = default;
  void encode_plain(std::string_view text, std::vector<int32_t>& ids) const;
  void check_id(int32_t id) const;

  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool strip_first_space_ = true;  // the model drops the dummy prefix's space when decoding
  std::string unk_surface_;
  std::vector<std::pair<std::string, int32_t>> control_pieces_;  // matched by parse_special, longest first
};

}  // namespace qkd
