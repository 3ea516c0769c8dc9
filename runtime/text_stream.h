// Streams generated text to a terminal one token at a time. Tokenizer::decode_token() yields raw bytes, and a
// byte-fallback vocabulary spells one character over several tokens (an emoji is four <0xNN> pieces), so
// printing each piece as it comes would print broken characters. TextStream releases only complete UTF-8
// characters and holds an incomplete tail back until the next piece completes it.
//
// Ill-formed bytes become U+FFFD, one per maximal ill-formed subpart (the Unicode "best practice" that Python's
// errors="replace" and sentencepiece's DecodeIds follow): a stray 0xFF is one U+FFFD, as is a lead byte that the
// next piece fails to continue. flush() at the end of generation turns a held-back incomplete tail into U+FFFD.
//
//   qkd::runtime::TextStream out;
//   for (...) std::fputs(out.push(tok.decode_token(prev, id)).c_str(), stdout);
//   std::fputs(out.flush().c_str(), stdout);
#pragma once

#include <string>
#include <string_view>

namespace qkd::runtime {

class TextStream {
 public:
  // Appends the bytes of one piece; returns the text that is now complete (possibly "").
  std::string push(std::string_view bytes);
  // Ends the stream: "" when nothing is held back, else one U+FFFD for the incomplete character. The stream is
  // empty afterwards and may be reused.
  std::string flush();
  // Bytes of an incomplete character held back (0..3).
  size_t pending() const { return pending_.size(); }

 private:
  std::string pending_;  // a well-formed but incomplete start of one UTF-8 character
};

}  // namespace qkd::runtime
