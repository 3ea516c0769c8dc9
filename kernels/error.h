// The one error path of qkd. Every failure, from a malformed file to a failed CUDA call, becomes a qkd::Error
// with a message that names the file, field or statement and the offending value. Apps catch it at the top,
// print the message on one line and exit non-zero.
#pragma once

#include <cstdint>
#include <mutex>
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

// The error of the lowest failing index of a parallel (OpenMP) loop: each iteration's catch hands its error to
// keep(), and after the loop rethrow() throws the one a serial loop would have thrown first, so the message does
// not depend on the thread schedule.
class FirstError {
 public:
  void keep(int64_t index, const Error& e) {
    const std::lock_guard<std::mutex> lock(mutex_);  // a mutex, not an omp critical: nvcc sees this header too
    if (index < index_) {
      index_ = index;
      what_ = e.what();
    }
  }
  void rethrow() const {
    if (index_ != kNone) throw Error(what_);
  }

 private:
  static constexpr int64_t kNone = INT64_MAX;
  int64_t index_ = kNone;
  std::string what_;
  std::mutex mutex_;
};

}  // namespace qkd

// Argument/shape validation in launchers and loaders: QKD_CHECK(cond, "rmsnorm: dim {} is odd", dim).
#define QKD_CHECK(cond, ...)                 \
  do {                                       \
    if (!(cond)) ::qkd::fail(__VA_ARGS__);   \
  } while (0)
