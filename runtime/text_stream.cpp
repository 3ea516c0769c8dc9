#include "runtime/text_stream.h"

#include "loader/tokenizer.h"

namespace qkd::runtime {

namespace {
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
}

std::string TextStream::push(std::string_view bytes) {
  std::string buf = std::move(pending_);
  pending_.clear();
  buf.append(bytes);
  std::string out;
  out.reserve(buf.size());
  size_t i = 0;
  while (i < buf.size()) {
    const std::string_view rest = std::string_view(buf).substr(i);
    const int n = utf8_char_length(rest);
    if (n > 0) {
      out.append(rest.substr(0, static_cast<size_t>(n)));
      i += static_cast<size_t>(n);
    } else if (n == 0) {
      pending_.assign(rest);  // the next piece may complete it
      break;
    } else {
      out.append(kReplacement);
      i += static_cast<size_t>(-n);
    }
  }
  return out;
}

std::string TextStream::flush() {
  if (pending_.empty()) return "";
  pending_.clear();
  return std::string(kReplacement);
}

}  // namespace qkd::runtime
