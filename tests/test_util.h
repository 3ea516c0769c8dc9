// Helpers shared by the tests: where the shared data is, and how a test skips when it is absent.
#pragma once

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

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

}  // namespace qkd::test

// Inside a TEST_CASE: returns early (with a message in the report) when ../shared/data is absent.
#define QKD_REQUIRE_SHARED_DATA()                                                              \
  do {                                                                                         \
    if (::qkd::test::shared_data().empty()) {                                                  \
      MESSAGE("skipped: ../shared/data is absent (it exists on developer machines and in CI)"); \
      return;                                                                                  \
    }                                                                                          \
  } while (0)
