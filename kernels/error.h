// The one error path of qkd. Every failure, from a malformed file to a failed CUDA call, becomes a qkd::Error
// with a message that names the file, field or statement and the offending value. Apps catch it at the top,
// print the message on one line and exit non-zero.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace qkd {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace qkd

// Argument/shape validation in launchers and loaders: QKD_CHECK(cond, "rmsnorm: dim {} is odd", dim).
#define QKD_CHECK(cond, ...)                 \
  do {                                       \
    if (!(cond)) ::qkd::fail(__VA_ARGS__);   \
  } while (0)
