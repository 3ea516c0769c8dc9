// Helpers shared by the tests: where the shared data is, and how a test skips when it is absent.
#pragma once

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "kernels/error.h"

namespace qkd::test {

// ../shared/data beside the checkout (QKD_SHARED_DATA overrides), or "" when absent.
inline std::string shared_data() {
  const char* env = std::getenv("QKD_SHARED_DATA");
  std::string dir = env != nullptr ? env : QKD_SHARED_DATA;
  return std::filesystem::is_directory(dir) ? dir : std::string();
}

inline std::string source_dir() { return QKD_SOURCE_DIR; }
inline std::string fixtures_dir() { return std::string(QKD_SOURCE_DIR) + "/tests/fixtures"; }
inline std::string bin_dir() { return QKD_BIN_DIR; }

// A fresh, private temporary directory, removed with everything in it when the test ends.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "qkd") {
    std::string tmpl = (std::filesystem::temp_directory_path() / ("qkd-test-" + tag + "-XXXXXX")).string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string str() const { return path.string(); }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::string operator/(const std::string& name) const { return file(name); }
  // Writes bytes to a file in the directory and returns its path.
  std::string write(const std::string& name, const std::string& bytes) const {
    const std::string p = file(name);
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
};

// The message of the qkd::Error that f throws, or "" when it throws none. Any other exception propagates and fails
// the test: bad input has to surface as a qkd::Error.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ::qkd::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace qkd::test

// Checks that expr throws a qkd::Error whose message contains every one of the given strings.
#define CHECK_ERROR_CONTAINS(expr, ...)                                                  \
  do {                                                                                   \
    const std::string msg_ = ::qkd::test::error_of([&] { (void)(expr); });              \
    INFO("error message: " << msg_);                                                     \
    REQUIRE_FALSE(msg_.empty());                                                         \
    for (const std::string& part_ : std::vector<std::string>{__VA_ARGS__})               \
      CHECK_MESSAGE(msg_.find(part_) != std::string::npos, "missing '" << part_ << "'"); \
  } while (0)

// Inside a TEST_CASE: returns early (with a message in the report) when ../shared/data is absent.
#define QKD_REQUIRE_SHARED_DATA()                                                              \
  do {                                                                                         \
    if (::qkd::test::shared_data().empty()) {                                                  \
      MESSAGE("skipped: ../shared/data is absent (it exists on developer machines and in CI)"); \
      return;                                                                                  \
    }                                                                                          \
  } while (0)
