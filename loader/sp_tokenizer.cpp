#include "loader/sp_tokenizer.h"

#include <algorithm>

#include <sentencepiece_processor.h>

#include "kernels/error.h"

namespace qkd {

namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581, sentencepiece's visible space

std::string replace_space_symbol(std::string_view piece) {
  std::string out;
  out.reserve(piece.size());
  size_t i = 0;
  while (i < piece.size()) {
    if (piece.substr(i).starts_with(kSpaceSymbol)) {
      out += ' ';
      i += kSpaceSymbol.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

}  // namespace

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_bytes(const std::string& path,
                                                                           std::string_view bytes) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  t->path_ = path;
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = t->sp_->LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    std::string why = status.ToString();
    while (!why.empty() && why.back() == ' ') why.pop_back();
    fail("tokenizer: {}: not a sentencepiece model: {}", path, why);
  }
  t->vocab_size_ = t->sp_->GetPieceSize();
  QKD_CHECK(t->vocab_size_ > 0, "tokenizer: {}: sentencepiece model has no pieces", path);
  t->bos_id_ = t->sp_->bos_id();
  t->eos_id_ = t->sp_->eos_id();

  int32_t spaced_piece = -1;
  for (int32_t id = 0; id < t->vocab_size_; ++id) {
    const std::string& piece = t->sp_->IdToPiece(id);
    if (t->sp_->IsControl(id) && !piece.empty()) t->control_pieces_.emplace_back(piece, id);
    if (spaced_piece < 0 && piece.starts_with(kSpaceSymbol) && !t->sp_->IsControl(id) &&
        !t->sp_->IsUnknown(id) && !t->sp_->IsByte(id)) {
      spaced_piece = id;
    }
  }
  // Longest first, so that a control piece that extends another one wins.
  std::stable_sort(t->control_pieces_.begin(), t->control_pieces_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  // Whether the first piece's space is dropped depends on the normalizer spec (add_dummy_prefix or
  // remove_extra_whitespaces), which this library build does not expose; ask DecodeIds instead.
  if (spaced_piece >= 0) {
    std::string text;
    const auto st = t->sp_->Decode(std::vector<int>{spaced_piece}, &text);
    if (!st.ok()) fail("tokenizer: {}: cannot decode piece {}: {}", path, spaced_piece, st.ToString());
    t->strip_first_space_ = text != replace_space_symbol(t->sp_->IdToPiece(spaced_piece));
  }
  const int unk = t->sp_->unk_id();
  if (unk >= 0 && unk < t->vocab_size_) {
    const auto st = t->sp_->Decode(std::vector<int>{unk}, &t->unk_surface_);
    if (!st.ok()) fail("tokenizer: {}: cannot decode <unk> ({}): {}", path, unk, st.ToString());
  }
  return t;
}

void SentencePieceTokenizer::check_id(int32_t id) const {
  QKD_CHECK(id >= 0 && id < vocab_size_, "tokenizer: {}: token id {} outside 0..{}", path_, id, vocab_size_ - 1);
}

void SentencePieceTokenizer::encode_plain(std::string_view text, std::vector<int32_t>& ids) const {
  std::vector<int> piece_ids;
  const auto status = sp_->Encode(text, &piece_ids);
  if (!status.ok()) fail("tokenizer: {}: sentencepiece encode failed: {}", path_, status.ToString());
  ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text, bool add_bos, bool add_eos,
                                                    bool parse_special) const {
  if (const int64_t bad = find_invalid_utf8(text); bad >= 0) {
    fail("prompt is not valid UTF-8: byte 0x{:02x} at offset {}", static_cast<unsigned char>(text[bad]), bad);
  }
  std::vector<int32_t> ids;
  if (add_bos) {
    QKD_CHECK(bos_id_ >= 0, "tokenizer: {}: BOS requested but the model defines no BOS piece", path_);
    ids.push_back(bos_id_);
  }
  if (!parse_special || control_pieces_.empty()) {
    encode_plain(text, ids);
  } else {
    size_t start = 0;  // beginning of the ordinary text not yet encoded
    size_t i = 0;
    while (i < text.size()) {
      const auto rest = text.substr(i);
      const auto match = std::find_if(control_pieces_.begin(), control_pieces_.end(),
                                      [&](const auto& c) { return rest.starts_with(c.first); });
      if (match == control_pieces_.end()) {
        ++i;
        continue;
      }
      encode_plain(text.substr(start, i - start), ids);
      ids.push_back(match->second);
      i += match->first.size();
      start = i;
    }
    encode_plain(text.substr(start), ids);
  }
  if (add_eos) {
    QKD_CHECK(eos_id_ >= 0, "tokenizer: {}: EOS requested but the model defines no EOS piece", path_);
    ids.push_back(eos_id_);
  }
  return ids;
}

std::string SentencePieceTokenizer::decode_token(int32_t prev, int32_t id) const {
  check_id(id);
  if (sp_->IsControl(id)) return "";
  if (sp_->IsUnknown(id)) return unk_surface_;
  std::string_view piece = sp_->IdToPiece(id);
  if (sp_->IsByte(id)) {
    const int byte = parse_byte_piece(piece);
    QKD_CHECK(byte >= 0, "tokenizer: {}: byte piece {} is '{}', not <0xNN>", path_, id, piece);
    return std::string(1, static_cast<char>(byte));
  }
  const bool at_text_start = prev < 0 || (prev < vocab_size_ && sp_->IsControl(prev));
  if (at_text_start && strip_first_space_ && piece.starts_with(kSpaceSymbol)) {
    piece.remove_prefix(kSpaceSymbol.size());
  }
  return replace_space_symbol(piece);
}

int32_t SentencePieceTokenizer::piece_to_id(std::string_view piece) const {
  // The library answers unk_id for pieces it does not know; only an exact match counts here.
  const int id = sp_->PieceToId(piece);
  if (id < 0 || id >= vocab_size_ || sp_->IdToPiece(id) != piece) return -1;
  return id;
}

std::string SentencePieceTokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return sp_->IdToPiece(id);
}

}  // namespace qkd
