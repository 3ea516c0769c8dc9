// What every tokenizer shares: decode as the concatenation of decode_token, strict UTF-8 validation, and the
// choice between the two file formats.
#include "loader/tokenizer.h"

#include "loader/gguf_tokenizer.h"

#include <cstring>

#include "kernels/error.h"
#include "loader/llama2c_tokenizer.h"
#include "loader/mmap_file.h"
#include "loader/sp_tokenizer.h"

namespace qkd {

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  int32_t prev = -1;
  for (int32_t id : ids) {
    text += decode_token(prev, id);
    prev = id;
  }
  return text;
}

int utf8_char_length(std::string_view s) {
  if (s.empty()) return 0;
  const auto b0 = static_cast<unsigned char>(s[0]);
  if (b0 < 0x80) return 1;
  int n = 0;
  // The second byte's range is where overlongs (E0, F0), surrogates (ED) and code points past U+10FFFF (F4)
  // are excluded; every later byte is a plain continuation byte 80..BF.
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return -1;  // a stray continuation byte, C0/C1 (always overlong) or F5..FF (past U+10FFFF)
  }
  for (int k = 1; k < n; ++k) {
    if (static_cast<size_t>(k) >= s.size()) return 0;
    const auto b = static_cast<unsigned char>(s[k]);
    if (b < lo || b > hi) return -k;
    lo = 0x80;
    hi = 0xBF;
  }
  return n;
}

int parse_byte_piece(std::string_view piece) {
  if (piece.size() != 6 || !piece.starts_with("<0x") || piece[5] != '>') return -1;
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    value *= 16;
    if (c >= '0' && c <= '9') value += c - '0';
    else if (c >= 'A' && c <= 'F') value += c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') value += c - 'a' + 10;  // llama2.c accepts either case
    else return -1;
  }
  return value;
}

int64_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const int n = utf8_char_length(s.substr(i));
    if (n <= 0) return static_cast<int64_t>(i);  // ill-formed, or a character cut off by the end of s
    i += static_cast<size_t>(n);
  }
  return -1;
}

// Format rule. A llama2.c tokenizer.bin starts with int32 max_token_length, a small positive number (27 for
// LLaMA-2's 32000 pieces). A sentencepiece .model is a serialized ModelProto whose first field is the repeated
// `pieces` message: tag 0x0A, a varint length, then the nested tag 0x0A or a length byte, so its first four
// bytes read as a little-endian int32 are at least 0x000A0000 = 655360. Any first int32 in 1..65536 therefore
// means llama2.c; everything else goes to the sentencepiece library, whose own parse is the final judge.
// File names are not consulted: both formats circulate as tokenizer.model and tokenizer.bin.
constexpr int32_t kMaxLlama2cTokenLength = 65536;

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_hint) {
  std::shared_ptr<const MappedFile> file;
  try {
    file = MappedFile::open(path);
  } catch (const Error& e) {
    fail("tokenizer: {}", e.what());
  }
  const auto bytes = std::string_view(reinterpret_cast<const char*>(file->data()), file->size());
  // A GGUF file carries its vocabulary in its metadata (the default model, a qkd checkpoint's tokenizer.gguf).
  if (bytes.substr(0, 4) == "GGUF") return load_gguf_tokenizer(path);
  int32_t first = 0;
  if (bytes.size() >= sizeof(first)) std::memcpy(&first, bytes.data(), sizeof(first));
  if (bytes.size() >= sizeof(first) && first >= 1 && first <= kMaxLlama2cTokenLength) {
    return Llama2cTokenizer::from_bytes(path, bytes, vocab_hint);
  }
  try {
    return SentencePieceTokenizer::from_bytes(path, bytes);
  } catch (const Error& e) {
    // A file that starts like a ModelProto is a damaged sentencepiece model; the llama2.c reading is noise there.
    if (!bytes.empty() && bytes[0] == '\x0A') throw;
    if (bytes.size() < sizeof(first)) {
      fail("{} (nor is it a llama2.c tokenizer.bin: the file has only {} bytes)", e.what(), bytes.size());
    }
    fail("{} (nor is it a llama2.c tokenizer.bin: its first int32, {}, is no max_token_length in 1..{})",
         e.what(), first, kMaxLlama2cTokenLength);
  }
}

}  // namespace qkd
