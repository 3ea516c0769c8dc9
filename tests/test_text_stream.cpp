// TextStream: whole UTF-8 characters out, incomplete tails held back, ill-formed bytes as U+FFFD. Expected
// outputs follow the Unicode standard's Table 3-7 and its "maximal subpart" replacement practice (the same
// answers Python's bytes.decode("utf-8", "replace") gives).
#include "runtime/text_stream.h"

#include <string>
#include <vector>

#include "loader/tokenizer.h"
#include "tests/test_util.h"

using qkd::runtime::TextStream;

namespace {

const std::string kFFFD = "\xEF\xBF\xBD";

// Pushes each piece and returns what each push released, then the flush.
std::vector<std::string> stream(const std::vector<std::string>& pieces) {
  TextStream s;
  std::vector<std::string> out;
  for (const auto& p : pieces) out.push_back(s.push(p));
  out.push_back(s.flush());
  return out;
}

}  // namespace

TEST_CASE("ASCII and whole characters pass straight through") {
  CHECK(stream({"Hello", ", ", "world"}) == std::vector<std::string>{"Hello", ", ", "world", ""});
  CHECK(stream({"caf\xC3\xA9", " \xE2\x82\xAC"}) == std::vector<std::string>{"caf\xC3\xA9", " \xE2\x82\xAC", ""});
  CHECK(stream({""}) == std::vector<std::string>{"", ""});
}

TEST_CASE("a multi-byte character split across pieces is released when complete") {
  // U+00E9 é = C3 A9
  CHECK(stream({"caf\xC3", "\xA9!"}) == std::vector<std::string>{"caf", "\xC3\xA9!", ""});
  // U+20AC € = E2 82 AC, one byte a piece
  CHECK(stream({"\xE2", "\x82", "\xAC"}) == std::vector<std::string>{"", "", "\xE2\x82\xAC", ""});
  // U+4E16 世 = E4 B8 96 then U+754C 界 = E7 95 8C, split mid-character twice
  CHECK(stream({"\xE4\xB8", "\x96\xE7", "\x95\x8C"}) ==
        std::vector<std::string>{"", "\xE4\xB8\x96", "\xE7\x95\x8C", ""});
  TextStream s;
  CHECK(s.push("a\xF0\x9F") == "a");
  CHECK(s.pending() == 2);
  CHECK(s.push("\x98\x80" "b") == "\xF0\x9F\x98\x80" "b");
  CHECK(s.pending() == 0);
}

TEST_CASE("an emoji spelled as four byte tokens") {
  // U+1F600 😀 = F0 9F 98 80
  CHECK(stream({"\xF0", "\x9F", "\x98", "\x80"}) == std::vector<std::string>{"", "", "", "\xF0\x9F\x98\x80", ""});
}

TEST_CASE("ill-formed bytes become one U+FFFD per maximal subpart") {
  CHECK(stream({"a\xFF" "b"}) == std::vector<std::string>{"a" + kFFFD + "b", ""});
  CHECK(stream({"\x80"}) == std::vector<std::string>{kFFFD, ""});                       // stray continuation
  CHECK(stream({"\xC0\xAF"}) == std::vector<std::string>{kFFFD + kFFFD, ""});           // overlong '/'
  CHECK(stream({"\xE0\x80\x80"}) == std::vector<std::string>{kFFFD + kFFFD + kFFFD, ""});  // overlong 3-byte
  CHECK(stream({"\xED\xA0\x80"}) == std::vector<std::string>{kFFFD + kFFFD + kFFFD, ""});  // surrogate D800
  CHECK(stream({"\xF4\x90\x80\x80"}) == std::vector<std::string>{kFFFD + kFFFD + kFFFD + kFFFD, ""});  // > 10FFFF
  CHECK(stream({"\xF5"}) == std::vector<std::string>{kFFFD, ""});
  // A lead byte whose next piece does not continue it: the held-back bytes are one U+FFFD, the rest is kept.
  CHECK(stream({"\xC3", "A"}) == std::vector<std::string>{"", kFFFD + "A", ""});
  CHECK(stream({"\xF0\x9F\x98", "X"}) == std::vector<std::string>{"", kFFFD + "X", ""});
  CHECK(stream({"\xE2\x82", "\xE2\x82\xAC"}) == std::vector<std::string>{"", kFFFD + "\xE2\x82\xAC", ""});
}

TEST_CASE("flush turns an incomplete tail into U+FFFD and resets the stream") {
  TextStream s;
  CHECK(s.push("ok\xE2\x82") == "ok");
  CHECK(s.pending() == 2);
  CHECK(s.flush() == kFFFD);
  CHECK(s.pending() == 0);
  CHECK(s.flush() == "");
  CHECK(s.push("\xAC") == kFFFD);  // the earlier lead bytes are gone, so this is a stray continuation
  CHECK(s.push("\xC3\xA9") == "\xC3\xA9");
}

TEST_CASE("streaming LLaMA-2's byte-fallback tokens rebuilds the text") {
  QKD_REQUIRE_SHARED_DATA();
  const auto tok = qkd::load_tokenizer(qkd::test::shared_data() + "/tokenizers/llama2/tokenizer.model");
  const std::string text = "Smile \xF0\x9F\x98\x80, rocket \xF0\x9F\x9A\x80 and \xE6\x97\xA5\xE6\x9C\xAC.";
  const auto ids = tok->encode(text, /*add_bos=*/true);
  TextStream s;
  std::string streamed;
  int32_t prev = -1;
  int empty_pushes = 0;
  for (int32_t id : ids) {
    const std::string piece = s.push(tok->decode_token(prev, id));
    CHECK(qkd::find_invalid_utf8(piece) == -1);  // never a broken character on screen
    empty_pushes += piece.empty() ? 1 : 0;
    streamed += piece;
    prev = id;
  }
  streamed += s.flush();
  CHECK(streamed == text);
  // 😀 and 🚀 are not LLaMA-2 pieces: each is four byte tokens, three of which release nothing (plus BOS).
  CHECK(empty_pushes >= 1 + 3 + 3);
}
