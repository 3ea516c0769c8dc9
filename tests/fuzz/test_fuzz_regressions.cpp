// The fuzz harnesses' bodies (harnesses.h) over every seed (tests/fuzz/corpus/<harness>) and every input a fuzzer
// once broke qkd with (tests/fuzz/regressions/<harness>), in the normal CPU suite: each input must load or end in
// a qkd::Error; another exception fails the case, a crash or a view outside the file aborts the test. No clang
// needed; under -DQKD_SANITIZE=ON the sanitizers watch it too.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "tests/fuzz/harnesses.h"

namespace {

namespace fs = std::filesystem;

std::vector<fs::path> files_in(const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

TEST_CASE("fuzz harnesses: every seed and every past finding loads or fails with a qkd::Error") {
  const fs::path root = fs::path(QKD_SOURCE_DIR) / "tests" / "fuzz";
  int seeds = 0, regressions = 0;
  for (const qkd::fuzz::Harness& h : qkd::fuzz::harnesses()) {
    for (const char* kind : {"corpus", "regressions"}) {
      for (const fs::path& f : files_in(root / kind / h.name)) {
        CAPTURE(f.string());
        const std::string bytes = read_bytes(f);
        CHECK_NOTHROW(h.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
        (std::string(kind) == "corpus" ? seeds : regressions) += 1;
      }
    }
    CHECK_MESSAGE(!files_in(root / "corpus" / h.name).empty(), fmt::format("harness {} has no seeds", h.name));
  }
  MESSAGE(fmt::format("{} seeds and {} regression inputs", seeds, regressions));
}
