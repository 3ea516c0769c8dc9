// Helpers shared by the tests: where the shared data is, and how a test skips when it is absent.
#pragma once

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

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

}  // namespace qkd::test

// Inside a TEST_CASE: returns early (with a message in the report) when ../shared/data is absent.
#define QKD_REQUIRE_SHARED_DATA()                                                              \
  do {                                                                                         \
    if (::qkd::test::shared_data().empty()) {                                                  \
      MESSAGE("skipped: ../shared/data is absent (it exists on developer machines and in CI)"); \
      return;                                                                                  \
    }                                                                                          \
  } while (0)
