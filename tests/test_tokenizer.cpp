// Tokenizers against independent references: the Python sentencepiece library's committed output
// (tests/fixtures/tokenizer/llama2_sp.json, tests/gen_tokenizer_fixtures.py), llama.cpp's test vectors for the
// same LLaMA vocabulary, a literal transcription of llama2.c run.c's encode() below, hand-built tokenizer.bin
// files, and Unicode's Table 3-7 for UTF-8 validation.
#include "loader/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "loader/llama2c_tokenizer.h"
#include "loader/sp_tokenizer.h"
#include "tests/test_util.h"

namespace {

using qkd::test::error_of;

using Ids = std::vector<int32_t>;

std::string shared(const std::string& rel) { return qkd::test::shared_data() + "/" + rel; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string show(const Ids& ids) { return fmt::format("[{}]", fmt::join(ids, " ")); }

struct Case {
  std::string text;
  Ids ids;
  std::string decoded;
};

std::vector<Case> load_fixture() {
  const auto j = nlohmann::json::parse(read_file(qkd::test::fixtures_dir() + "/tokenizer/llama2_sp.json"));
  std::vector<Case> cases;
  for (const auto& c : j.at("cases")) {
    cases.push_back({c.at("text").get<std::string>(), c.at("ids").get<Ids>(), c.at("decoded").get<std::string>()});
  }
  return cases;
}

// llama.cpp's vocabulary tests: strings separated by "\n__ggml_vocab_test__\n" lines (each string is followed
// by one), and one line of space-separated ids per string.
std::vector<std::pair<std::string, Ids>> load_llama_cpp_vectors() {
  const std::string base = shared("tokenizers/llama-spm-gguf/ggml-vocab-llama-spm.gguf");
  const std::string inp = read_file(base + ".inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t end = inp.find(sep, pos);
    REQUIRE(end != std::string::npos);
    texts.push_back(inp.substr(pos, end - pos));
    pos = end + sep.size();
  }
  std::istringstream out(read_file(base + ".out"));
  std::vector<std::pair<std::string, Ids>> vectors;
  std::string line;
  for (const auto& text : texts) {
    REQUIRE(std::getline(out, line));
    std::istringstream ids_in(line);
    Ids ids;
    for (int32_t id; ids_in >> id;) ids.push_back(id);
    vectors.emplace_back(text, ids);
  }
  return vectors;
}

// llama2.c run.c's encode() transcribed literally (rescan every pair, merge the best strictly-better one,
// leftmost on ties, byte fallback = byte + 3), with its own lookup table built from the pieces, lowest id first.
// Valid for vocabularies that have the byte pieces.
class RunC {
 public:
  explicit RunC(const qkd::Llama2cTokenizer& t) : t_(t) {
    for (int32_t id = 0; id < t.vocab_size(); ++id) lookup_.emplace(t.id_to_piece(id), id);
  }
  Ids encode(const std::string& text, bool bos) const;

 private:
  int32_t str_lookup(const std::string& s) const {
    const auto it = lookup_.find(s);
    return it == lookup_.end() ? -1 : it->second;
  }
  const qkd::Llama2cTokenizer& t_;
  std::map<std::string, int32_t> lookup_;
};

Ids RunC::encode(const std::string& text, bool bos) const {
  Ids tokens;
  if (bos) tokens.push_back(1);
  if (!text.empty()) tokens.push_back(str_lookup(" "));
  std::string buf;
  for (size_t c = 0; c < text.size(); ++c) {
    if ((text[c] & 0xC0) != 0x80) buf.clear();
    buf += text[c];
    if (c + 1 < text.size() && (text[c + 1] & 0xC0) == 0x80 && buf.size() < 4) continue;
    const int32_t id = str_lookup(buf);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (unsigned char b : buf) tokens.push_back(b + 3);
    }
    buf.clear();
  }
  while (true) {
    float best_score = -1e10f;
    int32_t best_id = -1;
    int best_idx = -1;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int32_t id = str_lookup(t_.id_to_piece(tokens[i]) + t_.id_to_piece(tokens[i + 1]));
      if (id != -1 && t_.score(id) > best_score) {
        best_score = t_.score(id);
        best_id = id;
        best_idx = static_cast<int>(i);
      }
    }
    if (best_idx == -1) break;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + best_idx + 1);
  }
  return tokens;
}

// A tokenizer.bin written by hand: header, then (score, len, bytes) per token.
std::string make_bin(int32_t max_len, const std::vector<std::pair<float, std::string>>& tokens) {
  std::string out(reinterpret_cast<const char*>(&max_len), 4);
  for (const auto& [score, piece] : tokens) {
    const auto len = static_cast<int32_t>(piece.size());
    out.append(reinterpret_cast<const char*>(&score), 4);
    out.append(reinterpret_cast<const char*>(&len), 4);
    out += piece;
  }
  return out;
}

// The ids 0..2 every llama2.c vocabulary starts with.
std::vector<std::pair<float, std::string>> control_tokens() {
  return {{0.0f, "<unk>"}, {0.0f, "\n<s>\n"}, {0.0f, "\n</s>\n"}};
}

struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name, const std::string& bytes)
      : path((std::filesystem::temp_directory_path() / fmt::format("qkd_tok_{}_{}", ::getpid(), name)).string()) {
    std::ofstream(path, std::ios::binary) << bytes;
  }
  ~TempFile() { std::filesystem::remove(path); }
};

}  // namespace

TEST_CASE("find_invalid_utf8 follows Unicode Table 3-7") {
  using qkd::find_invalid_utf8;
  CHECK(find_invalid_utf8("") == -1);
  CHECK(find_invalid_utf8("plain ASCII\n\t") == -1);
  CHECK(find_invalid_utf8(std::string_view("nul\0inside", 10)) == -1);
  CHECK(find_invalid_utf8("\xC2\x80 \xDF\xBF \xE0\xA0\x80 \xED\x9F\xBF \xEE\x80\x80 \xEF\xBF\xBF") == -1);
  CHECK(find_invalid_utf8("\xF0\x90\x80\x80 \xF4\x8F\xBF\xBF \xF0\x9F\x98\x80") == -1);
  CHECK(find_invalid_utf8("abc\xFF") == 3);
  CHECK(find_invalid_utf8("ab\x80") == 2);              // stray continuation byte
  CHECK(find_invalid_utf8("x\xC0\xAF") == 1);           // overlong '/'
  CHECK(find_invalid_utf8("x\xC1\xBF") == 1);           // overlong
  CHECK(find_invalid_utf8("\xE0\x9F\xBF") == 0);        // overlong 3-byte (< U+0800)
  CHECK(find_invalid_utf8("\xF0\x8F\xBF\xBF") == 0);    // overlong 4-byte (< U+10000)
  CHECK(find_invalid_utf8("ok\xED\xA0\x80") == 2);      // surrogate U+D800
  CHECK(find_invalid_utf8("ok\xED\xBF\xBF") == 2);      // surrogate U+DFFF
  CHECK(find_invalid_utf8("\xF4\x90\x80\x80") == 0);    // U+110000
  CHECK(find_invalid_utf8("\xF5\x80\x80\x80") == 0);
  CHECK(find_invalid_utf8("ab\xE2\x82") == 2);          // truncated at the end
  CHECK(find_invalid_utf8("ab\xE2\x82" "c") == 2);      // truncated in the middle
  CHECK(find_invalid_utf8("\xC3\xA9\xF0\x9F\x98") == 2);
}

TEST_CASE("utf8_char_length and parse_byte_piece") {
  using qkd::utf8_char_length;
  CHECK(utf8_char_length("") == 0);
  CHECK(utf8_char_length("a") == 1);
  CHECK(utf8_char_length("\xC3\xA9") == 2);
  CHECK(utf8_char_length("\xF0\x9F\x98\x80") == 4);
  CHECK(utf8_char_length("\xF0\x9F\x98") == 0);   // a well-formed start: more may come
  CHECK(utf8_char_length("\xF0\x9F\x98X") == -3);  // F0 9F 98 is the maximal ill-formed subpart
  CHECK(utf8_char_length("\xE0\x80") == -1);       // E0 cannot be followed by 80
  CHECK(utf8_char_length("\xFF") == -1);
  CHECK(qkd::parse_byte_piece("<0x0A>") == 10);
  CHECK(qkd::parse_byte_piece("<0xff>") == 255);
  CHECK(qkd::parse_byte_piece("<0xG0>") == -1);
  CHECK(qkd::parse_byte_piece("<0x0A") == -1);
  CHECK(qkd::parse_byte_piece("\xE2\x96\x81") == -1);
}

TEST_CASE("sentencepiece: ids and decodes from the Python library (fixture)") {
  QKD_REQUIRE_SHARED_DATA();
  const auto tok = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  REQUIRE(dynamic_cast<const qkd::SentencePieceTokenizer*>(tok.get()) != nullptr);
  CHECK(tok->vocab_size() == 32000);
  const auto cases = load_fixture();
  REQUIRE(cases.size() >= 40);
  for (const auto& c : cases) {
    CAPTURE(c.text);
    const Ids ids = tok->encode(c.text, /*add_bos=*/false);
    CHECK_MESSAGE(ids == c.ids, "got " << show(ids) << ", sentencepiece gives " << show(c.ids));
    CHECK(tok->decode(c.ids) == c.decoded);
    Ids with_bos{tok->bos_id()};
    with_bos.insert(with_bos.end(), c.ids.begin(), c.ids.end());
    CHECK(tok->encode(c.text, /*add_bos=*/true) == with_bos);
    CHECK(tok->decode(with_bos) == c.decoded);  // BOS decodes to "" and the first space still goes
    Ids with_eos = with_bos;
    with_eos.push_back(tok->eos_id());
    CHECK(tok->encode(c.text, true, /*add_eos=*/true) == with_eos);
  }
}

// llama.cpp (tests/test-tokenizer-0) tokenizes with add_special = false, i.e. no BOS, and for SPM vocabularies
// prepends a space (add_space_prefix). That is exactly sentencepiece's plain Encode: its dummy prefix is that
// space, so the vectors are reproduced by encode(text, add_bos = false) with nothing added or stripped, including
// "" -> [] and " " -> [259] ("▁▁").
TEST_CASE("sentencepiece: llama.cpp's LLaMA SPM vectors") {
  QKD_REQUIRE_SHARED_DATA();
  const auto tok = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  const auto vectors = load_llama_cpp_vectors();
  CHECK(vectors.size() == 46);
  for (const auto& [text, expected] : vectors) {
    CAPTURE(text);
    const Ids ids = tok->encode(text, /*add_bos=*/false);
    CHECK_MESSAGE(ids == expected, "got " << show(ids) << ", llama.cpp gives " << show(expected));
  }
}

TEST_CASE("sentencepiece: special pieces, lookups, decode_token") {
  QKD_REQUIRE_SHARED_DATA();
  const auto tok = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->is_end_of_generation(2));
  CHECK_FALSE(tok->is_end_of_generation(1));
  CHECK(tok->piece_to_id("<s>") == 1);
  CHECK(tok->piece_to_id("</s>") == 2);
  CHECK(tok->piece_to_id("\xE2\x96\x81Hello") == 15043);  // llama.cpp's vector for "Hello"
  CHECK(tok->piece_to_id("no such piece") == -1);
  CHECK(tok->id_to_piece(15043) == "\xE2\x96\x81Hello");
  CHECK(tok->id_to_piece(13) == "<0x0A>");

  // The leading space goes at the start of text and after a control piece, nowhere else.
  CHECK(tok->decode_token(-1, 15043) == "Hello");
  CHECK(tok->decode_token(1, 15043) == "Hello");
  CHECK(tok->decode_token(2, 15043) == "Hello");
  CHECK(tok->decode_token(13, 15043) == " Hello");
  CHECK(tok->decode_token(15043, 15043) == " Hello");
  CHECK(tok->decode_token(-1, 13) == "\n");
  CHECK(tok->decode_token(-1, 3 + 0xF0) == "\xF0");
  CHECK(tok->decode_token(7, 1) == "");
  CHECK(tok->decode_token(7, 2) == "");
  CHECK(tok->decode_token(7, 0) == " \xE2\x81\x87 ");  // sentencepiece's unknown surface " ⁇ "
  CHECK(error_of([&] { tok->decode_token(-1, 32000); }).find("token id 32000 outside 0..31999") !=
        std::string::npos);
  CHECK(error_of([&] { tok->decode_token(-1, -5); }).find("token id -5") != std::string::npos);
}

TEST_CASE("sentencepiece: parse_special matches <s> and </s> exactly") {
  QKD_REQUIRE_SHARED_DATA();
  const auto tok = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  const std::string turn1 = "[INST] What is 2+2? [/INST]";
  const std::string turn2 = " It is 4. ";
  const std::string text = "<s>" + turn1 + turn2 + "</s><s>[INST] Thanks [/INST]";
  // Meta's Llama-2 chat format: BOS + encode(turn) + EOS per turn, each turn encoded on its own.
  Ids expected{1};
  for (int32_t id : tok->encode(turn1 + turn2, false)) expected.push_back(id);
  expected.push_back(2);
  expected.push_back(1);
  for (int32_t id : tok->encode("[INST] Thanks [/INST]", false)) expected.push_back(id);
  const Ids got = tok->encode(text, false, false, /*parse_special=*/true);
  CHECK_MESSAGE(got == expected, "got " << show(got) << ", expected " << show(expected));
  // Without parse_special the markers are ordinary text.
  const Ids plain = tok->encode(text, false);
  CHECK(std::count(plain.begin(), plain.end(), 1) == 0);
  CHECK(std::count(plain.begin(), plain.end(), 2) == 0);
  CHECK(tok->decode(plain) == text);
  // Near misses are text too.
  const Ids near = tok->encode("<s >< /s>", false, false, true);
  CHECK(std::count(near.begin(), near.end(), 1) == 0);
}

TEST_CASE("llama2.c tokenizer.bin: every piece decodes and agrees with the .model pieces") {
  QKD_REQUIRE_SHARED_DATA();
  const auto bin = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.bin"));
  const auto sp = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  const auto* l2c = dynamic_cast<const qkd::Llama2cTokenizer*>(bin.get());
  REQUIRE(l2c != nullptr);
  CHECK(l2c->vocab_size() == 32000);
  CHECK(l2c->max_token_length() == 27);
  CHECK(l2c->has_byte_pieces());
  CHECK(l2c->id_to_piece(29871) == " ");
  CHECK(l2c->piece_to_id(" Hello") == 15043);
  int mismatches = 0;
  for (int32_t id = 0; id < l2c->vocab_size(); ++id) {
    CAPTURE(id);
    const std::string first = l2c->decode_token(-1, id);
    const std::string later = l2c->decode_token(29871, id);
    if (id == 1 || id == 2) {
      CHECK(first.empty());
      CHECK(later.empty());
    } else if (id >= 3 && id < 3 + 256) {
      CHECK(later == std::string(1, static_cast<char>(id - 3)));
    }
    if (id == 0) continue;  // <unk>: run.c prints the piece "<unk>", sentencepiece its " ⁇ " surface
    // Both files hold the same vocabulary, so the text every token contributes must agree.
    if (first != sp->decode_token(-1, id) || later != sp->decode_token(29871, id)) {
      if (++mismatches <= 5) FAIL_CHECK("piece " << id << " decodes differently from the .model");
    }
  }
  CHECK(mismatches == 0);
  CHECK(l2c->decode_token(1, 15043) == "Hello");  // run.c strips the space after BOS
  CHECK(l2c->decode_token(13, 15043) == " Hello");
}

TEST_CASE("llama2.c tokenizer.bin: encode equals run.c's encode transcribed") {
  QKD_REQUIRE_SHARED_DATA();
  const auto bin = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.bin"));
  const auto& l2c = dynamic_cast<const qkd::Llama2cTokenizer&>(*bin);
  const RunC run_c(l2c);
  std::vector<std::string> texts;
  for (const auto& c : load_fixture()) texts.push_back(c.text);
  for (const auto& [text, ids] : load_llama_cpp_vectors()) texts.push_back(text);
  std::istringstream corpus(read_file(shared("corpora/tinystories/stories_cased.txt")));
  std::string line;
  for (int i = 0; i < 20 && std::getline(corpus, line);) {
    if (line.empty()) continue;
    texts.push_back(line);
    ++i;
  }
  for (const auto& text : texts) {
    CAPTURE(text);
    for (bool bos : {false, true}) {
      const Ids got = l2c.encode(text, bos);
      const Ids ref = run_c.encode(text, bos);
      CHECK_MESSAGE(got == ref, "got " << show(got) << ", run.c gives " << show(ref));
    }
  }
}

// run.c's algorithm is sentencepiece's BPE (best-scoring adjacent merge, leftmost on ties, byte fallback) for
// a model with the identity normalizer and no user-defined pieces, which LLaMA-2's is; byte fallback before or
// after merging makes no difference because byte pieces never merge. So every fixture string and every llama.cpp
// vector agrees, whitespace runs, CJK and emoji included.
TEST_CASE("llama2.c tokenizer.bin agrees with sentencepiece on LLaMA-2") {
  QKD_REQUIRE_SHARED_DATA();
  const auto bin = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.bin"));
  for (const auto& c : load_fixture()) {
    CAPTURE(c.text);
    const Ids ids = bin->encode(c.text, false);
    CHECK_MESSAGE(ids == c.ids, "got " << show(ids) << ", sentencepiece gives " << show(c.ids));
    CHECK(bin->decode(c.ids) == c.decoded);
  }
  for (const auto& [text, expected] : load_llama_cpp_vectors()) {
    CAPTURE(text);
    CHECK(bin->encode(text, false) == expected);
  }
}

// Random strings over an alphabet that mixes ASCII, whitespace runs, accents, CJK, Cyrillic and emoji: the
// fast merge against run.c's loop and against the sentencepiece library, on the LLaMA-2 vocabulary.
TEST_CASE("llama2.c tokenizer.bin: random strings against run.c and sentencepiece") {
  QKD_REQUIRE_SHARED_DATA();
  const auto bin = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.bin"));
  const auto sp = qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model"));
  const RunC run_c(dynamic_cast<const qkd::Llama2cTokenizer&>(*bin));
  const std::vector<std::string> alphabet = {"a", "e", "t", "th", "ing", " ", " ", "  ", "\t", "\n", "0", "7", ".",
                                             ",", "'", "\xC3\xA9", "\xC3\xBC", "\xE6\x97\xA5", "\xE6\x9C\xAC",
                                             "\xD0\xB4", "\xD0\xB0", "\xF0\x9F\x98\x80", "\xE2\x82\xAC", "Q", "x"};
  std::mt19937 rng(1234);
  for (int n = 0; n < 300; ++n) {
    std::string text;
    const int len = static_cast<int>(rng() % 24);
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    CAPTURE(text);
    const Ids got = bin->encode(text, true);
    CHECK_MESSAGE(got == run_c.encode(text, true), "got " << show(got));
    const Ids want = sp->encode(text, true);
    CHECK_MESSAGE(got == want, "got " << show(got) << ", sentencepiece gives " << show(want));
    CHECK(bin->decode(got) == sp->decode(got));
  }
}

// tok105 is a character vocabulary (no merges, no byte pieces) trained with remove_extra_whitespaces, so the two
// formats agree on text without whitespace runs, leading/trailing spaces or characters outside the vocabulary;
// the first 50 lines of the TinyStories validation text are such text.
TEST_CASE("babyllama tok105: .model and .bin give the same ids") {
  QKD_REQUIRE_SHARED_DATA();
  const auto sp = qkd::load_tokenizer(shared("models/babyllama-tok105/tok105.model"));
  const auto bin = qkd::load_tokenizer(shared("models/babyllama-tok105/tok105.bin"), 105);
  REQUIRE(dynamic_cast<const qkd::SentencePieceTokenizer*>(sp.get()) != nullptr);
  REQUIRE(dynamic_cast<const qkd::Llama2cTokenizer*>(bin.get()) != nullptr);
  CHECK(sp->vocab_size() == 105);
  CHECK(bin->vocab_size() == 105);
  CHECK_FALSE(dynamic_cast<const qkd::Llama2cTokenizer&>(*bin).has_byte_pieces());
  std::istringstream corpus(read_file(shared("corpora/tinystories/stories_cased.txt")));
  std::string line;
  int lines = 0;
  for (int i = 0; i < 50 && std::getline(corpus, line); ++i) {
    if (line.empty()) continue;
    ++lines;
    CAPTURE(line);
    const Ids a = sp->encode(line, true);
    const Ids b = bin->encode(line, true);
    CHECK_MESSAGE(a == b, ".model gives " << show(a) << ", .bin gives " << show(b));
    CHECK(sp->decode(a) == line);
    CHECK(bin->decode(b) == line);
  }
  CHECK(lines >= 20);
  // Characters outside the vocabulary: one <unk> per run, as sentencepiece does, not run.c's byte + 3.
  const std::string emoji_run = "x\xF0\x9F\x98\x80\xF0\x9F\x98\x80y";
  CHECK(bin->encode(emoji_run, false) == sp->encode(emoji_run, false));
  CHECK(bin->encode(emoji_run, false) == Ids{3, 37, 0, 15});  // Python sentencepiece: ▁ x <unk> y
  CHECK(bin->encode("a#b", false) == sp->encode("a#b", false));
}

TEST_CASE("stories260K tok512.bin: loads and round-trips") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string path = shared("models/stories260K/tok512.bin");
  const auto tok = qkd::load_tokenizer(path);
  const auto& l2c = dynamic_cast<const qkd::Llama2cTokenizer&>(*tok);
  const RunC run_c(l2c);
  CHECK(tok->vocab_size() == 512);
  CHECK(qkd::load_tokenizer(path, 512)->vocab_size() == 512);
  CHECK(l2c.has_byte_pieces());
  std::vector<std::string> texts = {"Once upon a time, there was a little dog.",
                                    "Z\xC3\xBCrich \xF0\x9F\x98\x80 \xE6\x97\xA5",
                                    "  two leading spaces and a tab\there", "line\nbreaks\n\n", "x"};
  std::istringstream corpus(read_file(shared("corpora/tinystories/stories_cased.txt")));
  std::string line;
  for (int i = 0; i < 30 && std::getline(corpus, line);) {
    if (line.empty()) continue;
    texts.push_back(line);
    ++i;
  }
  for (const auto& text : texts) {
    CAPTURE(text);
    const Ids ids = tok->encode(text, true);
    for (int32_t id : ids) REQUIRE((id >= 0 && id < 512));
    CHECK(tok->decode(ids) == text);
    CHECK(ids == run_c.encode(text, true));
  }
  CHECK(tok->encode("", true) == Ids{1});
  CHECK(tok->encode("", false).empty());
}

TEST_CASE("hand-built tokenizer.bin: merges take the best score, leftmost on ties") {
  auto tokens = control_tokens();
  tokens.insert(tokens.end(), {{0.0f, " "}, {0.0f, "a"}, {0.0f, "b"}, {-1.0f, "ab"}, {-1.0f, "ba"}, {-2.0f, " a"},
                               {-0.5f, "aa"}});
  const TempFile f("merges.bin", make_bin(8, tokens));
  const auto tok = qkd::load_tokenizer(f.path);
  REQUIRE(tok->vocab_size() == 10);
  // " aba": " a" -2, "ab" -1, "ba" -1 -> leftmost -1 pair "ab" wins; " "+"ab" and "ab"+"a" are no pieces.
  CHECK(tok->encode("aba", false) == Ids{3, 6, 4});
  // " aab": "aa" -0.5 beats " a" -2 and "ab" -1.
  CHECK(tok->encode("aab", false) == Ids{3, 9, 5});
  // "c" is unknown and the vocabulary has no byte pieces: one <unk> per run of unknown characters.
  CHECK(tok->encode("acca", false) == Ids{8, 0, 4});
  CHECK(tok->encode("ca", true, true) == Ids{1, 3, 0, 4, 2});
  CHECK(tok->decode(Ids{1, 8, 6, 2}) == "aab");
  CHECK(tok->decode(Ids{4, 8}) == "a a");
}

TEST_CASE("load_tokenizer: errors name the file and the value") {
  const std::string missing = "/nonexistent/dir/tokenizer.model";
  CHECK(error_of([&] { qkd::load_tokenizer(missing); }) ==
        "tokenizer: " + missing + ": cannot open: No such file or directory");

  const auto base = control_tokens();
  const std::string good = make_bin(8, base);
  {
    const TempFile f("cut_record.bin", good + make_bin(8, {{-1.0f, "hello"}}).substr(4, 8 + 2));
    const std::string e = error_of([&] { qkd::load_tokenizer(f.path); });
    CHECK(e == "tokenizer: " + f.path + ": truncated at token 3: length 5 but only 2 bytes left");
  }
  {
    const TempFile f("cut_header.bin", good + std::string("\0\0\x80\xbf\x05", 5));
    const std::string e = error_of([&] { qkd::load_tokenizer(f.path); });
    CHECK(e.starts_with("tokenizer: " + f.path + ": truncated at token 3: 5 bytes left"));
  }
  {
    std::string bad = good + make_bin(8, {{-1.0f, "x"}}).substr(4);
    const int32_t absurd = 1000000;
    std::memcpy(&bad[bad.size() - 5], &absurd, 4);
    const TempFile f("absurd.bin", bad);
    CHECK(error_of([&] { qkd::load_tokenizer(f.path); }) ==
          "tokenizer: " + f.path + ": token 3: length 1000000 outside 0..max_token_length 8");
  }
  {
    const TempFile f("short.bin", good);
    CHECK(error_of([&] { qkd::load_tokenizer(f.path, 5); })
              .starts_with("tokenizer: " + f.path + ": truncated at token 3: 0 bytes left"));
    CHECK(error_of([&] { qkd::load_tokenizer(f.path, 2); }) ==
          "tokenizer: " + f.path + ": 14 bytes follow the 2 tokens of vocab_size 2");  // \n</s>\n: 8 + 6
    CHECK(qkd::load_tokenizer(f.path, 3)->vocab_size() == 3);
  }
  {
    const TempFile f("two_tokens.bin", make_bin(8, {{0.0f, "<unk>"}, {0.0f, "<s>"}}));
    CHECK(error_of([&] { qkd::load_tokenizer(f.path); }).find("2 tokens; the format needs at least") !=
          std::string::npos);
  }
  {
    const TempFile f("garbage.model", "this is neither format at all");
    const std::string e = error_of([&] { qkd::load_tokenizer(f.path); });
    CHECK(e.starts_with("tokenizer: " + f.path + ": not a sentencepiece model"));
    CHECK(e.find("nor is it a llama2.c tokenizer.bin") != std::string::npos);
  }
  {
    const TempFile f("empty.bin", "");
    CHECK(error_of([&] { qkd::load_tokenizer(f.path); }).starts_with("tokenizer: " + f.path + ":"));
  }
}

TEST_CASE("truncated real tokenizer files") {
  QKD_REQUIRE_SHARED_DATA();
  const std::string bytes = read_file(shared("models/stories260K/tok512.bin"));
  // Walk the format here to find where token 100's bytes start, then cut inside them.
  size_t offset = 4;
  int32_t len = 0;
  for (int i = 0; i <= 100; ++i) {
    std::memcpy(&len, bytes.data() + offset + 4, 4);
    if (i < 100) offset += 8 + static_cast<size_t>(len);
  }
  REQUIRE(len >= 1);
  const TempFile f("tok512_cut.bin", bytes.substr(0, offset + 8 + static_cast<size_t>(len) - 1));
  CHECK(error_of([&] { qkd::load_tokenizer(f.path); }) ==
        fmt::format("tokenizer: {}: truncated at token 100: length {} but only {} bytes left", f.path, len, len - 1));
  CHECK(error_of([&] { qkd::load_tokenizer(f.path, 512); }).find("truncated at token 100") != std::string::npos);

  const TempFile cut_model("cut.model", read_file(shared("tokenizers/llama2/tokenizer.model")).substr(0, 1000));
  const std::string e = error_of([&] { qkd::load_tokenizer(cut_model.path); });
  CHECK(e.starts_with("tokenizer: " + cut_model.path + ": not a sentencepiece model: "));
  CHECK(e.find("llama2.c") == std::string::npos);  // it starts like a ModelProto: no talk of the other format
}

TEST_CASE("invalid UTF-8 prompts throw naming the byte and its offset") {
  const TempFile f("utf8.bin", make_bin(8, control_tokens()));
  std::vector<std::unique_ptr<qkd::Tokenizer>> toks;
  toks.push_back(qkd::load_tokenizer(f.path));
  if (!qkd::test::shared_data().empty()) {
    toks.push_back(qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.model")));
    toks.push_back(qkd::load_tokenizer(shared("tokenizers/llama2/tokenizer.bin")));
  }
  for (const auto& tok : toks) {
    CHECK(error_of([&] { tok->encode("abc\xFF", true); }) == "prompt is not valid UTF-8: byte 0xff at offset 3");
    CHECK(error_of([&] { tok->encode("h\xC3\xA9llo \xED\xA0\x80", false); }) ==
          "prompt is not valid UTF-8: byte 0xed at offset 7");
    CHECK(error_of([&] { tok->encode("\xC0\xAF", false, false, true); }) ==
          "prompt is not valid UTF-8: byte 0xc0 at offset 0");
    CHECK(error_of([&] { tok->encode("end\xE2\x82", false); }) == "prompt is not valid UTF-8: byte 0xe2 at offset 3");
  }
}
