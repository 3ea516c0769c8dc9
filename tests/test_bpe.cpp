// Tokenizers from GGUF metadata against independent references:
//  - byte-level BPE (SmolLM2's vocabulary, committed as a tokenizer-only GGUF) against Hugging Face tokenizers'
//    ids for >= 200 committed strings (tests/gen_bpe_fixtures.py);
//  - SentencePiece-style (LLaMA's vocabulary in ../shared/data) against llama.cpp's own test vectors.
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/bpe_tokenizer.h"
#include "loader/gguf.h"
#include "loader/gguf_tokenizer.h"
#include "loader/mmap_file.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;
using namespace qkd;

namespace {

std::string bpe_fixture(const std::string& name) { return test::fixtures_dir() + "/bpe/" + name; }

nlohmann::json cases() { return nlohmann::json::parse(read_text_file(bpe_fixture("smollm2-cases.json"))); }

// The byte-level spelling of a word ("Ġworld" for " world"), as tokenizers' pre_tokenize_str reports it.
std::string byte_level(std::string_view word) {
  std::string out;
  for (char ch : word) {
    const uint32_t cp = byte_to_unicode(static_cast<uint8_t>(ch));
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

// Runs every committed case through tok; reports the first mismatches.
void check_cases(const Tokenizer& tok, size_t limit) {
  const nlohmann::json c = cases();
  size_t n = 0, bad = 0;
  std::string report;
  for (const auto& e : c["cases"]) {
    if (n++ == limit) break;
    const std::string text = e["text"];
    const bool parse_special = e["parse_special"];
    const auto want = e["ids"].get<std::vector<int32_t>>();
    const auto got = tok.encode(text, /*add_bos=*/false, false, parse_special);
    if (got != want && bad++ < 5)
      report += fmt::format("\n  text {:?} parse_special {}: want [{}] got [{}]", text, parse_special,
                            fmt::join(want, " "), fmt::join(got, " "));
  }
  INFO(bad << " of " << n << " cases differ:" << report);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("SmolLM2's byte-level BPE encodes every committed string as Hugging Face tokenizers does") {
  const auto tok = load_gguf_tokenizer(bpe_fixture("smollm2-vocab.gguf"));
  CHECK(tok->vocab_size() == 49152);
  CHECK(cases()["cases"].size() >= 200);
  check_cases(*tok, SIZE_MAX);
}

TEST_CASE("SmolLM2's vocabulary: ids, flags, end of generation, decoding") {
  const auto tok = load_gguf_tokenizer(bpe_fixture("smollm2-vocab.gguf"));
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->piece_to_id("<|im_end|>") == 2);
  CHECK(tok->piece_to_id("<|im_start|>") == 1);
  CHECK(tok->piece_to_id("no such piece") == -1);
  CHECK(tok->id_to_piece(2) == "<|im_end|>");
  CHECK(tok->is_end_of_generation(2));   // <|im_end|>: eos, and the end of a chatml turn
  CHECK(tok->is_end_of_generation(0));   // <|endoftext|>
  CHECK(!tok->is_end_of_generation(1));  // <|im_start|>
  // tokenizer.ggml.add_bos_token is false: a BOS request adds nothing, as transformers does for SmolLM2.
  CHECK(tok->encode("Hello", true) == tok->encode("Hello", false));
  CHECK(tok->decode_token(-1, 2).empty());  // control tokens are not text

  // Byte-level BPE is lossless, multi-byte characters included, except for the bytes SmolLM2 has no token for
  // (some C0 controls): those are dropped, as tokenizers drops them.
  auto has_all_bytes = [&](const std::string& text) {
    for (char ch : text)
      if (tok->piece_to_id(byte_level(std::string_view(&ch, 1))) < 0) return false;
    return true;
  };
  CHECK(!has_all_bytes("\x04"));
  CHECK(tok->decode(tok->encode("a\x04" "b", false)) == "ab");
  const nlohmann::json c = cases();
  size_t checked = 0;
  for (const auto& e : c["cases"]) {
    if (e["parse_special"] || !has_all_bytes(e["text"])) continue;
    const std::string text = e["text"];
    CAPTURE(text);
    CHECK(tok->decode(tok->encode(text, false)) == text);
    ++checked;
  }
  CHECK(checked >= 200);

  try {
    tok->encode("ab\xC3(", false);
    FAIL("invalid UTF-8 was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("smollm2-vocab.gguf: the text is not valid UTF-8 at byte 2") != std::string::npos);
  }
}

TEST_CASE("the smollm pre-tokenizer splits as tokenizers' Digits + ByteLevel does") {
  const nlohmann::json c = cases();
  for (const auto& e : c["pretokenize"]) {
    const std::string text = e["text"];
    CAPTURE(text);
    std::vector<std::string> got;
    for (std::string_view w : bpe_pretokenize(text, BpePreTokenizer::DigitsThenGpt2)) got.push_back(byte_level(w));
    CHECK(got == e["words"].get<std::vector<std::string>>());
  }
  // "gpt2" keeps digit runs together, with a leading space (the regex's " ?\p{N}+").
  CHECK(bpe_pretokenize("a 123", BpePreTokenizer::Gpt2) == std::vector<std::string_view>{"a", " 123"});
  CHECK(bpe_pretokenize("a 123", BpePreTokenizer::DigitsThenGpt2) ==
        std::vector<std::string_view>{"a", " ", "1", "2", "3"});
}

TEST_CASE("pre-tokenizers and vocabularies qkd does not implement fail by name") {
  const GgufFile f = GgufFile::open(bpe_fixture("smollm2-vocab.gguf"));
  GgufVocab v = read_gguf_vocab(f);
  v.pre = "llama-bpe";
  try {
    BpeTokenizer t(v);
    FAIL("an unknown pre-tokenizer was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("smollm2-vocab.gguf: tokenizer.ggml.pre 'llama-bpe' is not a pre-tokenizer qkd "
                                     "implements (smollm and gpt2 are)") != std::string::npos);
  }
  v = read_gguf_vocab(f);
  v.merges[5] = "nospace";
  try {
    BpeTokenizer t(v);
    FAIL("a malformed merge was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("tokenizer.ggml.merges[5] = 'nospace' is not two pieces") != std::string::npos);
  }
}

TEST_CASE("the default model's own GGUF, when fetched, has the committed vocabulary") {
  const std::string path = default_model_path();
  if (path.empty() || !fs::exists(path)) {
    MESSAGE("skipped: " << path << " is absent (tools/fetch-default-model.sh puts it there)");
    return;
  }
  const auto tok = load_gguf_tokenizer(path);
  CHECK(tok->vocab_size() == 49152);
  check_cases(*tok, SIZE_MAX);
}

TEST_CASE("LLaMA's SentencePiece vocabulary from GGUF matches llama.cpp's test vectors") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string dir = test::shared_data() + "/tokenizers/llama-spm-gguf/";
  const auto tok = load_gguf_tokenizer(dir + "ggml-vocab-llama-spm.gguf");
  CHECK(tok->vocab_size() == 32000);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);

  // .inp: strings separated by "\n__ggml_vocab_test__\n" (one after the last string too); .out: one line of
  // ids per string.
  const std::string inp = read_text_file(dir + "ggml-vocab-llama-spm.gguf.inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t end = inp.find(sep, pos);
    REQUIRE(end != std::string::npos);
    texts.push_back(inp.substr(pos, end - pos));
    pos = end + sep.size();
  }
  std::istringstream out(read_text_file(dir + "ggml-vocab-llama-spm.gguf.out"));
  std::vector<std::vector<int32_t>> expected;
  for (std::string line; std::getline(out, line);) {
    std::istringstream ids(line);
    expected.emplace_back();
    for (int32_t id; ids >> id;) expected.back().push_back(id);
  }
  REQUIRE(texts.size() == expected.size());
  CHECK(texts.size() == 46);
  for (size_t k = 0; k < texts.size(); ++k) {
    CAPTURE(texts[k]);
    const auto ids = tok->encode(texts[k], /*add_bos=*/false);
    CHECK(ids == expected[k]);
    CHECK(tok->decode(ids) == texts[k]);
  }
  // add_bos_token is true in this vocabulary: a BOS request adds <s>, and <s> in text is special only on request.
  CHECK(tok->encode("Hello", true) == std::vector<int32_t>{1, 15043});
  CHECK(tok->encode("<s>Hello", false, false, true) == std::vector<int32_t>{1, 15043});
  CHECK(tok->encode("<s>", false, false, false) != std::vector<int32_t>{1});
  CHECK(tok->decode_token(1, 15043) == "Hello");
  CHECK(tok->decode_token(15043, 15043) == " Hello");
}
