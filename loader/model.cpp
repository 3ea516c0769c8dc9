// load_model: picks the loader from what is on disk, not from the file name.
#include "loader/model.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "kernels/error.h"
#include "loader/gguf.h"
#include "loader/hf_checkpoint.h"
#include "loader/int4_checkpoint.h"
#include "loader/llama2c.h"

namespace qkd {

ModelWeights load_model(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  // Before the HF check: a qkd int4 checkpoint directory has a config.json too.
  if (is_int4_checkpoint(path)) return load_int4_checkpoint(path);
  if (fs::is_directory(path, ec)) {
    QKD_CHECK(fs::exists(fs::path(path) / "config.json"),
              "{}: a directory without config.json is not a Hugging Face checkpoint", path);
    return load_hf_checkpoint(path);
  }
  std::ifstream in(path, std::ios::binary);
  QKD_CHECK(in.good(), "{}: cannot open: {}", path, std::strerror(errno));
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) return load_gguf_model(path);
  return load_llama2c(path);
}

}  // namespace qkd
