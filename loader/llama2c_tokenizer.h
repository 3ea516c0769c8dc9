// llama2.c's tokenizer.bin: int32 max_token_length, then per token float32 score, int32 len, len bytes (the
// sentencepiece piece with U+2581 written as ' '). There is no count: vocab_hint tokens are read when given,
// else tokens are read to the end of the file. Ids 0, 1, 2 are <unk>, <s>, </s> by the format's convention
// (llama2.c hard-codes BOS = 1, EOS = 2 and byte tokens at 3 + byte).
//
// encode() gives exactly the ids of llama2.c run.c's encode(): optional BOS, the " " dummy-prefix token when the
// text is non-empty, every UTF-8 character looked up whole or else split into byte tokens (id = byte + 3), then
// repeated merging of the adjacent pair whose concatenation is the best-scoring piece (leftmost on ties).
// Departures from run.c, all where run.c misbehaves:
// - vocabularies without the 256 byte pieces at ids 3..258 (babyllama's tok105) map an unknown character to
//   <unk> (one per run of unknown characters, as sentencepiece does) instead of to an unrelated id byte + 3;
// - if " " is not a piece the dummy prefix falls back like any unknown character (run.c would write id -1);
// - a piece string that occurs twice resolves to its lower id (run.c's bsearch picks either);
// - parse_special has no effect: tokenizer.bin does not mark control pieces.
// decode_token() is run.c's decode(): "<0xNN>" pieces give the raw byte and the leading space of the first piece
// is dropped after BOS, and also at the start of text (prev = -1) or after EOS, as sentencepiece's DecodeIds
// does, so that decode(ids) agrees with the .model tokenizer; BOS and EOS give "" (their stored text is
// "\n<s>\n", which run.c never prints because it stops at BOS).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loader/tokenizer.h"

namespace qkd {

class Llama2cTokenizer final : public Tokenizer {
 public:
  // bytes: the whole tokenizer.bin; path names the file in errors. vocab_hint > 0 demands exactly that many
  // tokens (a file with fewer or more is an error).
  static std::unique_ptr<Llama2cTokenizer> from_bytes(const std::string& path, std::string_view bytes,
                                                      int vocab_hint = 0);

  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool add_eos = false,
                              bool parse_special = false) const override;
  std::string decode_token(int32_t prev, int32_t id) const override;
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t piece_to_id(std::string_view piece) const override;
  std::string id_to_piece(int32_t id) const override;

  int max_token_length() const { return max_token_length_; }
  float score(int32_t id) const;
  bool has_byte_pieces() const { return has_byte_pieces_; }

 private:
  Llama2cTokenizer() = default;
  void check_id(int32_t id) const;
  void merge_pairs(std::vector<int32_t>& tokens) const;

  std::string path_;
  int max_token_length_ = 0;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> piece_ids_;
  bool has_byte_pieces_ = false;
};

}  // namespace qkd
